// A Kotlin app's first steps with the fedtune SDK, compiled against the generated bindings and
// run on the JVM (JNA loads the host library) by mobile/tests/bindings.rs, against a real
// fedtune-server on loopback. Arguments: address, certificate PEM, signing key, token, model
// path, data folder.

import java.util.concurrent.LinkedBlockingQueue
import java.util.concurrent.TimeUnit
import uniffi.fedtune_mobile.*

class Recorder : ProgressListener {
    val events = LinkedBlockingQueue<Any>()
    override fun onEvent(event: ProgressEvent) { events.put(event) }
    override fun onError(error: FedtuneException) { events.put(error) }

    fun <T> waitFor(kind: Class<T>): T {
        val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60)
        val seen = mutableListOf<Any>()
        while (System.nanoTime() < deadline) {
            val item = events.poll(50, TimeUnit.MILLISECONDS) ?: continue
            seen.add(item)
            if (kind.isInstance(item)) return kind.cast(item)
        }
        throw AssertionError("never saw ${kind.simpleName}; saw $seen")
    }
}

fun verify(condition: Boolean, what: () -> String) {
    if (!condition) throw AssertionError(what())
}

fun main(args: Array<String>) {
    val (address, certificate, signingKey, token, model, dataDir) = args
    val server = ServerIdentity(address = address, certificatePem = certificate, signingKey = signingKey)
    fun settings(server: ServerIdentity) = ClientSettings(
        server = server,
        enrollmentToken = token,
        dataDir = dataDir,
        modelPath = model,
        backend = BackendPreference.CPU,
        policy = TrainingPolicy.WhenChargingOnUnmeteredIdle(minBattery = 0.2f),
        sequenceLength = 16u,
    )

    // A bad address is a typed exception.
    try {
        FedtuneClient(settings(server.copy(address = "not an address")), Recorder())
        throw AssertionError("bad address accepted")
    } catch (e: FedtuneException.InvalidConfig) {
        verify(e.reason.contains("not an address")) { e.reason }
    }

    val listener = Recorder()
    val client = FedtuneClient(settings(server), listener)
    verify(client.state() == ClientState.IDLE) { "state ${client.state()}" }
    verify(client.addTextExample("to be or not to be") == 1uL) { "example count" }
    verify(client.addInstructionExample("say hello", "hello!") == 2uL) { "example count" }
    client.setConditions(
        DeviceConditions(
            charging = true, batteryLevel = 0.8f, unmeteredNetwork = true, idle = true,
            thermal = ThermalState.NOMINAL,
        )
    )
    client.enroll()
    val loaded = listener.waitFor(ProgressEvent.ModelLoaded::class.java)
    verify(loaded.backend == "cpu") { loaded.toString() }
    val enrolled = listener.waitFor(ProgressEvent.Enrolled::class.java)
    verify(client.deviceId() == enrolled.deviceId) { "device id ${client.deviceId()}" }
    client.shutdown()
    // Wait for the SDK's thread to release the listener before the JVM exits.
    val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60)
    while (!client.isShutDown()) {
        verify(System.nanoTime() < deadline) { "the SDK thread never ended" }
        Thread.sleep(10)
    }
    try {
        client.enroll()
        throw AssertionError("a closed client enrolled")
    } catch (e: FedtuneException.Closed) {
    }
    client.close() // frees the Rust object (AutoCloseable)
    println("kotlin app: all checks passed")
}

private operator fun <T> Array<T>.component6(): T = this[5]
