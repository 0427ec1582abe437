"""An app's use of the fedtune SDK through the generated Python bindings, against a real
fedtune-server on loopback (started by mobile/tests/bindings.rs, which passes the server's
identity, the token and the model as one JSON argument). Every check is an assert; the last
line printed says all passed."""

import json
import queue
import sys
import time

from fedtune_mobile import (
    BackendPreference,
    ClientSettings,
    ClientState,
    DeviceConditions,
    FedtuneClient,
    FedtuneError,
    ProgressEvent,
    ProgressListener,
    ServerIdentity,
    ThermalState,
    TrainingPolicy,
    parse_server_identity,
)

TIMEOUT_S = 60


class Recorder(ProgressListener):
    """Collects events and errors from the SDK's thread."""

    def __init__(self):
        self.events = queue.Queue()
        self.seen = []

    def on_event(self, event):
        self.events.put(("event", event))

    def on_error(self, error):
        self.events.put(("error", error))

    def wait_for(self, want, what):
        """Returns the first event or error satisfying `want`, remembering all seen."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                item = self.events.get(timeout=0.05)
            except queue.Empty:
                continue
            self.seen.append(item)
            if want(item):
                return item[1]
        raise AssertionError(f"never saw {what}; saw {self.seen}")

    def drain(self, seconds):
        """Everything that arrives within `seconds`."""
        end = time.monotonic() + seconds
        got = []
        while time.monotonic() < end:
            try:
                got.append(self.events.get(timeout=0.05))
            except queue.Empty:
                pass
        self.seen.extend(got)
        return got


def event(kind):
    return lambda item: item[0] == "event" and isinstance(item[1], kind)


def error(kind):
    return lambda item: item[0] == "error" and isinstance(item[1], kind)


def conditions(charging):
    return DeviceConditions(
        charging=charging,
        battery_level=0.9,
        unmetered_network=True,
        idle=True,
        thermal=ThermalState.NOMINAL,
    )


def shut_down(client):
    """Shuts the client down and waits until its thread has released the listener."""
    client.shutdown()
    deadline = time.monotonic() + TIMEOUT_S
    while not client.is_shut_down():
        assert time.monotonic() < deadline, "the SDK thread never ended"
        time.sleep(0.01)


def settings(args, server, data_dir, token):
    return ClientSettings(
        server=server,
        enrollment_token=token,
        data_dir=data_dir,
        model_path=args["model"],
        backend=BackendPreference.CPU,
        policy=TrainingPolicy.WHEN_CHARGING_ON_UNMETERED_IDLE(min_battery=0.2),
        sequence_length=16,
    )


def main():
    args = json.loads(sys.argv[1])
    server = ServerIdentity(
        address=args["address"],
        certificate_pem=args["certificate_pem"],
        signing_key=args["signing_key"],
    )

    # The identity file's text parses into the same record; junk is a typed error.
    from_file = parse_server_identity(
        json.dumps(
            {
                "address": args["address"],
                "certificate_pem": args["certificate_pem"],
                "signing_key": args["signing_key"],
            }
        )
    )
    assert from_file == server, (from_file, server)
    try:
        parse_server_identity("{}")
        raise AssertionError("junk identity accepted")
    except FedtuneError.InvalidConfig:
        pass

    # A bad server address is a typed error at creation, before any work starts.
    bad = ServerIdentity(
        address="phone.invalid:443",
        certificate_pem=args["certificate_pem"],
        signing_key=args["signing_key"],
    )
    try:
        FedtuneClient(settings(args, bad, args["data_dir"], args["token"]), Recorder())
        raise AssertionError("bad address accepted")
    except FedtuneError.InvalidConfig as e:
        assert "phone.invalid:443" in str(e), str(e)
    print("typed errors: ok")

    listener = Recorder()
    client = FedtuneClient(settings(args, server, args["data_dir"], args["token"]), listener)
    assert client.state() == ClientState.IDLE

    # Starting with no examples is refused at once.
    try:
        client.start()
        raise AssertionError("started without examples")
    except FedtuneError.NoTrainingData:
        pass

    # Local examples, in the on-device store.
    client.add_text_example("to be or not to be, that is the question. " * 3)
    client.add_text_example("all the world's a stage, and all the men and women merely players.")
    count = client.add_instruction_example("say hello", "hello there!")
    assert count == 3 and client.example_count() == 3

    # Starting before enrolling: the model loads, then a typed error arrives.
    client.start()
    loaded = listener.wait_for(event(ProgressEvent.MODEL_LOADED), "the model loading")
    assert loaded.backend == "cpu", loaded
    listener.wait_for(error(FedtuneError.NotEnrolled), "NotEnrolled")

    client.enroll()
    enrolled = listener.wait_for(event(ProgressEvent.ENROLLED), "enrollment")
    assert client.device_id() == enrolled.device_id and len(enrolled.device_id) > 0

    # Unplugged: the policy defers and no plan is taken.
    client.set_conditions(conditions(charging=False))
    client.start()
    deferred = listener.wait_for(event(ProgressEvent.DEFERRED), "a deferral")
    assert deferred.reason == "not charging", deferred
    assert client.state() == ClientState.DEFERRED
    quiet = listener.drain(0.5)
    assert not any(
        isinstance(e, (ProgressEvent.PLAN_RECEIVED, ProgressEvent.REPORTED)) for _, e in quiet
    ), quiet
    print("policy refusal: ok")

    # Plugged in: a plan arrives, the tiny model trains, the report is acknowledged.
    client.set_conditions(conditions(charging=True))
    plan = listener.wait_for(event(ProgressEvent.PLAN_RECEIVED), "a plan")
    assert plan.round == 1, plan
    ready = listener.wait_for(event(ProgressEvent.REPORT_READY), "a trained report")
    assert ready.round == 1, ready
    reported = listener.wait_for(event(ProgressEvent.REPORTED), "an acknowledged report")
    assert reported.round == 1 and not reported.duplicate, reported
    print("plan, training, report: ok")

    # Paused: nothing new starts until resumed.
    client.pause()
    listener.wait_for(event(ProgressEvent.PAUSED), "the pause")
    assert client.state() == ClientState.PAUSED
    quiet = listener.drain(0.5)
    assert not any(isinstance(e, ProgressEvent.PLAN_RECEIVED) for _, e in quiet), quiet
    client.start()
    resumed = listener.wait_for(
        lambda item: event(ProgressEvent.REPORTED)(item) and item[1].round > 1,
        "a report after resuming",
    )
    print(f"pause and resume: ok (round {resumed.round} after resuming)")

    # Stopped: a Stopped event, the state says so, the examples are still on the device.
    client.stop()
    listener.wait_for(event(ProgressEvent.STOPPED), "the stop")
    assert client.state() == ClientState.STOPPED
    events = [e for kind, e in listener.seen if kind == "event"]
    for expected in [
        ProgressEvent.MODEL_LOADED,
        ProgressEvent.ENROLLED,
        ProgressEvent.CONNECTED,
        ProgressEvent.DEFERRED,
        ProgressEvent.PLAN_RECEIVED,
        ProgressEvent.REPORT_READY,
        ProgressEvent.REPORTED,
        ProgressEvent.PAUSED,
        ProgressEvent.STOPPED,
    ]:
        assert any(isinstance(e, expected) for e in events), (expected, events)
    shut_down(client)
    try:
        client.start()
        raise AssertionError("a closed client started")
    except FedtuneError.Closed:
        pass
    print("stop and close: ok")

    # A reopened client sees the stored examples and the enrollment.
    again = Recorder()
    reopened = FedtuneClient(settings(args, server, args["data_dir"], ""), again)
    assert reopened.example_count() == 3
    reopened.enroll()
    assert again.wait_for(event(ProgressEvent.ENROLLED), "re-enrollment").device_id == enrolled.device_id
    shut_down(reopened)

    # A bad enrollment token: the server refuses, a typed error reaches the listener.
    other = Recorder()
    stranger = FedtuneClient(settings(args, server, args["other_data_dir"], "not-a-token"), other)
    stranger.enroll()
    refused = other.wait_for(error(FedtuneError.Refused), "the refusal")
    assert "token" in str(refused).lower(), str(refused)
    shut_down(stranger)
    print("refused enrollment: ok")

    print("python app: all checks passed")


if __name__ == "__main__":
    main()
