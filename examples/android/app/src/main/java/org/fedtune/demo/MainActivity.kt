// fedtune inside an Android app: one Activity that configures the SDK, feeds it the phone's
// conditions, shows progress and lets the user start, pause and stop. It uses the generated
// bindings in mobile/bindings/kotlin exactly as generated (package uniffi.fedtune_mobile);
// see mobile/README.md for the build (cargo-ndk, jniLibs, JNA).

package org.fedtune.demo

import android.app.Activity
import android.content.BroadcastReceiver
import android.content.Context
import android.content.Intent
import android.content.IntentFilter
import android.net.ConnectivityManager
import android.net.Network
import android.net.NetworkCapabilities
import android.os.BatteryManager
import android.os.Bundle
import android.os.PowerManager
import android.widget.Button
import android.widget.LinearLayout
import android.widget.TextView
import uniffi.fedtune_mobile.*

class MainActivity : Activity() {
    private lateinit var client: FedtuneClient
    private lateinit var status: TextView
    private var conditions = DeviceConditions(
        charging = false, batteryLevel = 0f, unmeteredNetwork = false, idle = false,
        thermal = ThermalState.NOMINAL,
    )

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        status = TextView(this)
        val layout = LinearLayout(this).apply { orientation = LinearLayout.VERTICAL }
        layout.addView(status)
        for ((label, action) in listOf<Pair<String, () -> Unit>>(
            "Start" to { client.start() },
            "Pause" to { client.pause() },
            "Stop" to { client.stop() },
        )) {
            layout.addView(Button(this).apply {
                text = label
                setOnClickListener {
                    try { action() } catch (e: FedtuneException) { show("error: $e") }
                }
            })
        }
        setContentView(layout)

        // The operator's server-identity.json and the model ship as assets (copied to files/).
        val identity = parseServerIdentity(assets.open("server-identity.json").bufferedReader().readText())
        client = FedtuneClient(
            ClientSettings(
                server = identity,
                enrollmentToken = BuildConfig.FEDTUNE_TOKEN,
                dataDir = filesDir.resolve("fedtune").path,
                modelPath = filesDir.resolve("model.gguf").path,
                backend = BackendPreference.AUTOMATIC,
                policy = TrainingPolicy.WhenChargingOnUnmeteredIdle(minBattery = 0.3f),
                sequenceLength = 64u,
            ),
            object : ProgressListener {
                // Called on the SDK's thread: hop to the UI thread.
                override fun onEvent(event: ProgressEvent) = show(describe(event))
                override fun onError(error: FedtuneException) = show("error: $error")
            },
        )
        // The app's own data, kept on the phone; only model updates leave it.
        if (client.exampleCount() == 0uL) {
            client.addInstructionExample("How do I reset my router?", "Hold the reset button for ten seconds.")
        }
        client.enroll()
        watchConditions()
    }

    override fun onDestroy() {
        client.shutdown()
        client.close()
        super.onDestroy()
    }

    private fun describe(event: ProgressEvent): String = when (event) {
        is ProgressEvent.PlanReceived -> "round ${event.round}: training"
        is ProgressEvent.Reported -> "round ${event.round}: sent"
        is ProgressEvent.Deferred -> "waiting: ${event.reason}"
        else -> event.toString()
    }

    private fun show(text: String) = runOnUiThread { status.text = text }

    /** Battery, network and heat, sent to the SDK whenever one changes. */
    private fun watchConditions() {
        registerReceiver(object : BroadcastReceiver() {
            override fun onReceive(context: Context, intent: Intent) {
                val plugged = intent.getIntExtra(BatteryManager.EXTRA_PLUGGED, 0) != 0
                val level = intent.getIntExtra(BatteryManager.EXTRA_LEVEL, 0).toFloat() /
                    intent.getIntExtra(BatteryManager.EXTRA_SCALE, 100)
                val power = getSystemService(PowerManager::class.java)
                update(conditions.copy(charging = plugged, batteryLevel = level, idle = !power.isInteractive))
            }
        }, IntentFilter(Intent.ACTION_BATTERY_CHANGED))
        getSystemService(ConnectivityManager::class.java).registerDefaultNetworkCallback(
            object : ConnectivityManager.NetworkCallback() {
                override fun onCapabilitiesChanged(network: Network, caps: NetworkCapabilities) = update(
                    conditions.copy(unmeteredNetwork = caps.hasCapability(NetworkCapabilities.NET_CAPABILITY_NOT_METERED))
                )
            })
        getSystemService(PowerManager::class.java).addThermalStatusListener { level ->
            update(conditions.copy(thermal = when {
                level >= PowerManager.THERMAL_STATUS_CRITICAL -> ThermalState.CRITICAL
                level >= PowerManager.THERMAL_STATUS_SEVERE -> ThermalState.SERIOUS
                level >= PowerManager.THERMAL_STATUS_MODERATE -> ThermalState.FAIR
                else -> ThermalState.NOMINAL
            }))
        }
    }

    @Synchronized
    private fun update(next: DeviceConditions) {
        conditions = next
        client.setConditions(next)
    }
}
