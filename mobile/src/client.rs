//! The object an app holds: [`FedtuneClient`]. Every call returns at once; the work (loading
//! the model, enrolling, training rounds) runs on one background thread the client owns, with
//! its own tokio runtime, and reports through the app's [`ProgressListener`].
//!
//! Pause, resume, stop and new device conditions go straight to the running client SDK through
//! its [`ClientHandle`] (a non-blocking channel send); enrollment and runs go to the background
//! thread as commands. What the app asked for last (run, pause, stop) is kept here, so an order
//! given before the model has loaded is applied when it has.

use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fedtune_client::client::Control;
use fedtune_client::{Client, ClientConfig, ClientHandle, Event, Outcome};
use fedtune_shared::pretrained::Pretrained;
use fedtune_shared::protocol::Capabilities;
use fedtune_shared::protocol::blob::model_digest;
use fedtune_shared::tokenizer::Tokenizer;
use tokio::sync::mpsc;

use crate::backend;
use crate::conditions::{DeviceConditions, unknown_conditions};
use crate::error::FedtuneError;
use crate::example_store::{ExampleStore, StoredExample};
use crate::progress::{ClientState, ProgressEvent, ProgressListener};
use crate::settings::{CheckedSettings, ClientSettings};

/// Longest wait between reconnection attempts: long enough to spare a phone's radio, short
/// enough that a server back from maintenance sees the device within a minute.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What the background thread is asked to do.
#[derive(Debug)]
enum Command {
    Enroll,
    Start,
    Shutdown,
}

/// State shared by the app's calls and the background thread.
struct Shared {
    state: ClientState,
    device_id: Option<String>,
    /// The app's last order; applied to the client SDK when it exists.
    desired: Control,
    conditions: fedtune_client::DeviceConditions,
    handle: Option<ClientHandle>,
    closed: bool,
    /// The background thread has ended and released the listener.
    shut_down: bool,
}

/// The listener plus the shared state it updates: every event changes the state first, then
/// reaches the app, so `state()` called from the listener is already current.
struct Reporter {
    listener: Box<dyn ProgressListener>,
    shared: Arc<Mutex<Shared>>,
}

impl Reporter {
    fn event(&self, event: ProgressEvent) {
        {
            let mut shared = lock(&self.shared);
            if let Some(state) = event.state_after() {
                shared.state = state;
            }
            if let ProgressEvent::Enrolled { device_id } = &event {
                shared.device_id = Some(device_id.clone());
            }
        }
        self.listener.on_event(event);
    }

    fn error(&self, error: FedtuneError) {
        tracing::warn!(%error, "background work failed");
        lock(&self.shared).state = ClientState::Failed;
        self.listener.on_error(error);
    }
}

/// The mutex guards plain data with no invariants across fields, so a panic while it was held
/// (in an app's listener) leaves nothing half-done: carry on with the data.
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// fedtune's client inside an app: enrolls the device, trains on the app's local examples when
/// the policy allows, and sends model updates (never the examples) to the pinned server.
///
/// Every method returns at once (the UI thread never waits on the network or on training);
/// results and progress arrive through the `ProgressListener` given at creation.
#[derive(uniffi::Object)]
pub struct FedtuneClient {
    shared: Arc<Mutex<Shared>>,
    commands: mpsc::UnboundedSender<Command>,
    store: Mutex<ExampleStore>,
}

#[uniffi::export]
impl FedtuneClient {
    /// Checks the settings, opens the example store and starts the background thread. The
    /// model is loaded there, on the first `enroll` or `start` (a
    /// `ProgressEvent::ModelLoaded` follows).
    ///
    /// Throws `FedtuneError::InvalidConfig` for an address, certificate or key that does
    /// not parse, `FedtuneError::Model` for a model path that does not exist and
    /// `FedtuneError::Storage` for a data folder that cannot be created.
    #[uniffi::constructor]
    pub fn new(
        settings: ClientSettings,
        listener: Box<dyn ProgressListener>,
    ) -> Result<Arc<Self>, FedtuneError> {
        let settings = settings.check()?;
        let store = ExampleStore::open(&settings.data_dir)?;
        let shared = Arc::new(Mutex::new(Shared {
            state: ClientState::Idle,
            device_id: None,
            desired: Control::Pause,
            conditions: unknown_conditions(),
            handle: None,
            closed: false,
            shut_down: false,
        }));
        let (commands, receiver) = mpsc::unbounded_channel();
        let reporter = Reporter {
            listener,
            shared: shared.clone(),
        };
        std::thread::Builder::new()
            .name("fedtune-sdk".into())
            .spawn(move || Worker::new(settings, reporter).run(receiver))
            .map_err(|e| FedtuneError::Storage {
                reason: format!("cannot start the SDK thread: {e}"),
            })?;
        Ok(Arc::new(Self {
            shared,
            commands,
            store: Mutex::new(store),
        }))
    }

    /// Enrolls the device with the settings' token (once: an enrolled device just reports
    /// `ProgressEvent::Enrolled` again). The outcome arrives as that event or through
    /// `ProgressListener::on_error` (`FedtuneError::Refused` for a bad token,
    /// `FedtuneError::Network` for an unreachable server).
    pub fn enroll(&self) -> Result<(), FedtuneError> {
        self.send(Command::Enroll)
    }

    /// Starts training (or resumes after `pause` or `stop`). Training runs only while the
    /// policy allows it under the conditions last given to
    /// `set_conditions`; otherwise `ProgressEvent::Deferred` says
    /// why and the SDK waits.
    ///
    /// Throws `FedtuneError::NoTrainingData` when the example store is empty;
    /// `FedtuneError::NotEnrolled` arrives through the listener when `enroll` has not
    /// succeeded.
    pub fn start(&self) -> Result<(), FedtuneError> {
        if lock_store(&self.store).count() == 0 {
            return Err(FedtuneError::NoTrainingData);
        }
        {
            let mut shared = lock(&self.shared);
            shared.desired = Control::Run;
            if let Some(handle) = &shared.handle {
                handle.resume();
            }
        }
        self.send(Command::Start)
    }

    /// Pauses after the current step: a round being trained finishes and is sent, no new one
    /// starts until `start`.
    pub fn pause(&self) -> Result<(), FedtuneError> {
        self.order(Control::Pause)
    }

    /// Stops at the next safe point (state stays on disk; `start` continues where it left).
    /// `ProgressEvent::Stopped` follows.
    pub fn stop(&self) -> Result<(), FedtuneError> {
        self.order(Control::Stop)
    }

    /// Tells the SDK the device's current conditions; the policy re-decides at once.
    pub fn set_conditions(&self, conditions: DeviceConditions) -> Result<(), FedtuneError> {
        let mut shared = lock(&self.shared);
        if shared.closed {
            return Err(FedtuneError::Closed);
        }
        shared.conditions = conditions.into();
        if let Some(handle) = &shared.handle {
            handle.set_conditions(shared.conditions);
        }
        Ok(())
    }

    /// Adds a plain-text training example to the on-device store (it never leaves the
    /// device). Returns the number of examples stored. Examples added while training count
    /// from the next `start`.
    pub fn add_text_example(&self, text: String) -> Result<u64, FedtuneError> {
        lock_store(&self.store).add(&StoredExample::Text { text })
    }

    /// Adds an instruction and the response the model should give (one chat turn) to the
    /// on-device store. Returns the number of examples stored.
    pub fn add_instruction_example(
        &self,
        instruction: String,
        response: String,
    ) -> Result<u64, FedtuneError> {
        lock_store(&self.store).add(&StoredExample::Instruction {
            instruction,
            response,
        })
    }

    /// The number of examples in the on-device store.
    pub fn example_count(&self) -> u64 {
        lock_store(&self.store).count()
    }

    /// Deletes every stored example (a user who withdraws their data).
    pub fn clear_examples(&self) -> Result<(), FedtuneError> {
        lock_store(&self.store).clear()
    }

    /// Where the client is now.
    pub fn state(&self) -> ClientState {
        lock(&self.shared).state
    }

    /// The device's id once enrolled (known after the model has loaded).
    pub fn device_id(&self) -> Option<String> {
        lock(&self.shared).device_id.clone()
    }

    /// Whether the background thread has ended after `shutdown` (and
    /// released the listener). Apps need not wait for it; a host about to exit its process
    /// (a script) should, so the SDK never calls into it while it tears down.
    pub fn is_shut_down(&self) -> bool {
        lock(&self.shared).shut_down
    }

    /// Stops any run and ends the background thread at its next safe point (a training step
    /// in progress finishes first); every later call throws `FedtuneError::Closed`.
    /// Returns at once; dropping the client does the same.
    pub fn shutdown(&self) {
        let mut shared = lock(&self.shared);
        shared.closed = true;
        if let Some(handle) = &shared.handle {
            handle.stop();
        }
        let _ = self.commands.send(Command::Shutdown);
    }
}

impl FedtuneClient {
    fn send(&self, command: Command) -> Result<(), FedtuneError> {
        if lock(&self.shared).closed {
            return Err(FedtuneError::Closed);
        }
        self.commands
            .send(command)
            .map_err(|_| FedtuneError::Closed)
    }

    fn order(&self, control: Control) -> Result<(), FedtuneError> {
        let mut shared = lock(&self.shared);
        if shared.closed {
            return Err(FedtuneError::Closed);
        }
        shared.desired = control;
        if let Some(handle) = &shared.handle {
            apply(handle, control);
        }
        Ok(())
    }
}

impl Drop for FedtuneClient {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock_store(store: &Mutex<ExampleStore>) -> MutexGuard<'_, ExampleStore> {
    // Plain data: the count is re-read from disk only on open, so a poisoned lock (a panic in
    // a write) at worst under-counts until the next open.
    store
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn apply(handle: &ClientHandle, control: Control) {
    match control {
        Control::Run => handle.resume(),
        Control::Pause => handle.pause(),
        Control::Stop => handle.stop(),
    }
}

/// The background thread's side: the client SDK, created on first use.
struct Worker {
    settings: CheckedSettings,
    reporter: Arc<Reporter>,
    loaded: Option<Loaded>,
}

/// The client SDK over the loaded model, and the tokenizer that turns examples into tokens.
struct Loaded {
    client: Client,
    tokenizer: Tokenizer,
}

impl Worker {
    fn new(settings: CheckedSettings, reporter: Reporter) -> Self {
        Self {
            settings,
            reporter: Arc::new(reporter),
            loaded: None,
        }
    }

    fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let shared = self.reporter.shared.clone();
        // One thread for the network; training itself runs on the runtime's blocking pool.
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(self.serve(&mut commands)),
            Err(e) => self.reporter.error(FedtuneError::Storage {
                reason: format!("cannot start the SDK runtime: {e}"),
            }),
        }
        // The app's listener is released here, by this thread, before `is_shut_down` turns
        // true: a host that waits for it (a Python script before exiting) never has the SDK
        // call into it while it tears itself down.
        drop(self);
        lock(&shared).shut_down = true;
        tracing::debug!("SDK thread ends");
    }

    async fn serve(&mut self, commands: &mut mpsc::UnboundedReceiver<Command>) {
        while let Some(command) = commands.recv().await {
            let result = match command {
                Command::Shutdown => break,
                Command::Enroll => self.enroll().await,
                Command::Start => self.start(commands).await,
            };
            match result {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => self.reporter.error(e),
            }
        }
    }

    /// The loaded client, loading the model first if needed.
    fn loaded(&mut self) -> Result<&mut Loaded, FedtuneError> {
        if self.loaded.is_none() {
            lock(&self.reporter.shared).state = ClientState::Preparing;
            let loaded = self.load()?;
            self.loaded = Some(loaded);
        }
        // Just filled above.
        self.loaded.as_mut().ok_or(FedtuneError::Closed)
    }

    fn load(&self) -> Result<Loaded, FedtuneError> {
        let settings = &self.settings;
        let model_error = |e: &dyn std::fmt::Display| FedtuneError::Model {
            reason: format!("{}: {e}", settings.model_path.display()),
        };
        let (device, backend) = backend::device(settings.backend)?;
        let pretrained = Pretrained::open(&settings.model_path, &device, |_, _| {})
            .map_err(|e| model_error(&e))?;
        let base_model = model_digest(&settings.model_path).map_err(|e| model_error(&e))?;
        let reporter = self.reporter.clone();
        let config = ClientConfig {
            server: settings.server.clone(),
            state_dir: settings.data_dir.join("state"),
            base_model,
            capabilities: Capabilities {
                platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
                backend: backend.into(),
                memory_bytes: 0,
                base_model,
            },
            policy: settings.policy.build(),
            listener: Arc::new(move |event: Event| {
                if let Some(event) = ProgressEvent::from_client(event) {
                    reporter.event(event);
                }
            }),
            max_backoff: MAX_BACKOFF,
        };
        let (client, handle) = Client::new(config, pretrained.model, Default::default())?;
        {
            let mut shared = lock(&self.reporter.shared);
            handle.set_conditions(shared.conditions);
            apply(&handle, shared.desired);
            shared.device_id = client.device().map(|d| d.to_string());
            shared.handle = Some(handle);
            shared.state = ClientState::Idle;
        }
        self.reporter.event(ProgressEvent::ModelLoaded {
            backend: backend.into(),
        });
        Ok(Loaded {
            client,
            tokenizer: pretrained.tokenizer,
        })
    }

    /// `Ok(true)`: carry on with the next command.
    async fn enroll(&mut self) -> Result<bool, FedtuneError> {
        let token = self.settings.token.clone();
        let reporter = self.reporter.clone();
        let loaded = self.loaded()?;
        if let Some(device) = loaded.client.device() {
            reporter.event(ProgressEvent::Enrolled {
                device_id: device.to_string(),
            });
            return Ok(true);
        }
        lock(&reporter.shared).state = ClientState::Preparing;
        // The client SDK emits `Enrolled` itself on success.
        let outcome = loaded.client.enroll(&token).await;
        lock(&reporter.shared).state = ClientState::Idle;
        outcome?;
        Ok(true)
    }

    /// One run of the client SDK, until stopped, finished or failed. Commands arriving
    /// meanwhile: another `start` is already served; `enroll` is answered from the state;
    /// `shutdown` stops the run and ends the thread. `Ok(false)`: end the thread.
    async fn start(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Result<bool, FedtuneError> {
        let sequence_length = self.settings.sequence_length;
        let store = ExampleStore::open(&self.settings.data_dir)?;
        let reporter = self.reporter.clone();
        let loaded = self.loaded()?;
        let Some(device) = loaded.client.device() else {
            return Err(FedtuneError::NotEnrolled);
        };
        let data = store.training_data(&loaded.tokenizer, sequence_length)?;
        if data.sequences.is_empty() {
            return Err(FedtuneError::NoTrainingData);
        }
        loaded.client.set_training_data(data);
        {
            // The app's last order wins: a `stop` given after this `start` was queued holds.
            let shared = lock(&reporter.shared);
            if shared.desired == Control::Stop {
                return Ok(true);
            }
            if let Some(handle) = &shared.handle {
                apply(handle, shared.desired);
            }
        }
        let mut keep_going = true;
        let mut run = pin!(loaded.client.run());
        let outcome = loop {
            tokio::select! {
                outcome = &mut run => break outcome,
                command = commands.recv() => match command {
                    Some(Command::Start) => {}
                    Some(Command::Enroll) => reporter.event(ProgressEvent::Enrolled {
                        device_id: device.to_string(),
                    }),
                    Some(Command::Shutdown) | None => {
                        keep_going = false;
                        if let Some(handle) = &lock(&reporter.shared).handle {
                            handle.stop();
                        }
                    }
                },
            }
        };
        match outcome? {
            Outcome::Finished { .. } => {}
            Outcome::Stopped => reporter.event(ProgressEvent::Stopped),
        }
        Ok(keep_going)
    }
}
