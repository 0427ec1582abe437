// fedtune inside an iOS app: a SwiftUI view that configures the SDK, feeds it the phone's
// conditions, shows progress and lets the user start, pause and stop. It uses the generated
// bindings in mobile/bindings/swift exactly as generated; see mobile/README.md for the build
// (static library per target, XCFramework, Metal chosen explicitly by the SDK).

import Network
import SwiftUI
import UIKit

/// Receives the SDK's events on its thread and republishes them on the main thread.
final class FedtuneModel: ObservableObject, ProgressListener, @unchecked Sendable {
    @Published var status = "starting"
    private var client: FedtuneClient?
    private var conditions = DeviceConditions(
        charging: false, batteryLevel: 0, unmeteredNetwork: false, idle: false, thermal: .nominal)
    private let network = NWPathMonitor()

    func onEvent(event: ProgressEvent) {
        let text: String
        switch event {
        case let .planReceived(round): text = "round \(round): training"
        case let .reported(round, _): text = "round \(round): sent"
        case let .deferred(reason): text = "waiting: \(reason)"
        default: text = "\(event)"
        }
        DispatchQueue.main.async { self.status = text }
    }

    func onError(error: FedtuneError) {
        DispatchQueue.main.async { self.status = "error: \(error)" }
    }

    func setUp() {
        do {
            let support = try FileManager.default.url(
                for: .applicationSupportDirectory, in: .userDomainMask, appropriateFor: nil, create: true)
            let identityURL = Bundle.main.url(forResource: "server-identity", withExtension: "json")!
            let client = try FedtuneClient(
                settings: ClientSettings(
                    server: try parseServerIdentity(json: String(contentsOf: identityURL, encoding: .utf8)),
                    enrollmentToken: Bundle.main.object(forInfoDictionaryKey: "FedtuneToken") as? String ?? "",
                    dataDir: support.appendingPathComponent("fedtune").path,
                    modelPath: Bundle.main.path(forResource: "model", ofType: "gguf")!,
                    backend: .automatic,
                    policy: .whenChargingOnUnmeteredIdle(minBattery: 0.3),
                    sequenceLength: 64),
                listener: self)
            // The app's own data, kept on the phone; only model updates leave it.
            if client.exampleCount() == 0 {
                _ = try client.addInstructionExample(
                    instruction: "How do I reset my router?",
                    response: "Hold the reset button for ten seconds.")
            }
            try client.enroll()
            self.client = client
            watchConditions()
        } catch {
            status = "error: \(error)"
        }
    }

    func start() { act { try $0.start() } }
    func pause() { act { try $0.pause() } }
    func stop() { act { try $0.stop() } }

    private func act(_ call: (FedtuneClient) throws -> Void) {
        guard let client else { return }
        do { try call(client) } catch { status = "error: \(error)" }
    }

    /// Battery, network and heat, sent to the SDK whenever one changes.
    private func watchConditions() {
        UIDevice.current.isBatteryMonitoringEnabled = true
        let center = NotificationCenter.default
        for name in [UIDevice.batteryStateDidChangeNotification, UIDevice.batteryLevelDidChangeNotification,
                     ProcessInfo.thermalStateDidChangeNotification] {
            center.addObserver(forName: name, object: nil, queue: .main) { [weak self] _ in self?.readDevice() }
        }
        network.pathUpdateHandler = { [weak self] path in
            DispatchQueue.main.async {
                guard let self else { return }
                self.conditions.unmeteredNetwork = path.status == .satisfied && !path.isExpensive
                self.send()
            }
        }
        network.start(queue: .global(qos: .utility))
        readDevice()
    }

    private func readDevice() {
        let device = UIDevice.current
        conditions.charging = device.batteryState == .charging || device.batteryState == .full
        conditions.batteryLevel = max(device.batteryLevel, 0)
        // A phone charging with the screen locked is the idle case the policy waits for.
        conditions.idle = UIApplication.shared.applicationState != .active
        switch ProcessInfo.processInfo.thermalState {
        case .nominal: conditions.thermal = .nominal
        case .fair: conditions.thermal = .fair
        case .serious: conditions.thermal = .serious
        default: conditions.thermal = .critical
        }
        send()
    }

    private func send() { act { try $0.setConditions(conditions: self.conditions) } }

    deinit { client?.shutdown() }
}

struct ContentView: View {
    @StateObject private var model = FedtuneModel()

    var body: some View {
        VStack(spacing: 16) {
            Text(model.status)
            HStack {
                Button("Start") { model.start() }
                Button("Pause") { model.pause() }
                Button("Stop") { model.stop() }
            }
        }
        .padding()
        .onAppear { model.setUp() }
    }
}
