// sidecar-bench: what the Swift client costs on top of the raw pipes.
//
//   swift run -c release sidecar-bench [--runs 5] [--pings 2000] [--tokens 200000] [--token-runs 3]
//                                      [--python python3] [--home DIR] [--json FILE]
//
// --home: the sidecars' MLSIDECAR_HOME (default: a fresh temporary directory, removed at the end).
// bench/clients.py runs this with --runs 1 --json, round by round against the Python host.
//
// (a) ping round trip, one at a time: through SidecarClient vs the raw baseline (RawSidecar: the
//     JSON line written and read on the same kind of child pipes, no client layer); the median of
//     each run's median, and their ratio (target <= 1.05).
// (b) `$/token` events per second reaching user code from one `debug/stream` request (target
//     >= 50,000/s), with the raw line rate of the same sidecar for reference.
import Foundation
import MLSidecar

var settings = (runs: 5, pings: 2000, tokens: 200_000, tokenRuns: Int?.none, python: "python3", json: String?.none,
                home: String?.none)
var arguments = CommandLine.arguments.dropFirst()
while let flag = arguments.popFirst() {
    let value = arguments.popFirst() ?? ""
    switch flag {
    case "--runs": settings.runs = Int(value) ?? settings.runs
    case "--pings": settings.pings = Int(value) ?? settings.pings
    case "--tokens": settings.tokens = Int(value) ?? settings.tokens
    case "--token-runs": settings.tokenRuns = Int(value)
    case "--home": settings.home = value
    case "--python": settings.python = value
    case "--json": settings.json = value
    default: FileHandle.standardError.write(Data("unknown option \(flag)\n".utf8)); exit(2)
    }
}

let home = settings.home.map { URL(fileURLWithPath: $0) }
    ?? FileManager.default.temporaryDirectory.appendingPathComponent("sidecar-bench-\(UUID().uuidString)")
try FileManager.default.createDirectory(at: home, withIntermediateDirectories: true)
defer { if settings.home == nil { try? FileManager.default.removeItem(at: home) } }
let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
let environment = ProcessInfo.processInfo.environment.merging([
    "MLSIDECAR_HOME": home.path, "PYTHONPATH": repoRoot.path, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
]) { _, new in new }
let sidecarArguments = [settings.python, "-m", "sidecar", "--debug"]

/// The middle value; per-ping times are noisy, so runs compare medians.
func median(_ values: [Double]) -> Double {
    let sorted = values.sorted()
    return sorted.isEmpty ? .nan : sorted.count % 2 == 1 ? sorted[sorted.count / 2]
        : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
}

func seconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) + Double(duration.components.attoseconds) * 1e-18
}

let client = SidecarClient(configuration: SidecarConfiguration(arguments: sidecarArguments, environment: environment))
try await client.start()
let raw = try RawSidecar(sidecarArguments, environment: environment)
raw.initialize(SidecarProtocol.version)

func clientPingRun(_ client: SidecarClient, _ count: Int) async throws -> Double {
    var times: [Double] = []
    times.reserveCapacity(count)
    for _ in 0..<count {
        let start = ContinuousClock.now
        _ = try await client.ping().result()
        times.append(seconds(ContinuousClock.now - start))
    }
    return median(times)
}

func clientTokenRun(_ client: SidecarClient, _ count: Int) async throws -> Double {
    let start = ContinuousClock.now
    var received = 0
    for try await update in await client.debugStream(DebugStreamParams(count: count)) {
        if case .event(.token(let token)) = update {
            precondition(token.seq == received, "seq gap: \(token.seq) after \(received - 1)")
            received += 1
        }
    }
    precondition(received == count, "got \(received) of \(count) tokens")
    return Double(count) / seconds(ContinuousClock.now - start)
}

// Warm both up, then alternate them run by run so that the machine's load hits both alike.
_ = try await clientPingRun(client, 200)
_ = raw.pingRun(200)
var clientPings: [Double] = [], rawPings: [Double] = [], clientTokens: [Double] = [], rawTokens: [Double] = []
for _ in 0..<settings.runs {
    rawPings.append(raw.pingRun(settings.pings))
    clientPings.append(try await clientPingRun(client, settings.pings))
}
let tokenRuns = settings.tokenRuns ?? max(3, settings.runs / 2)  // 0: pings only
if tokenRuns > 0 { _ = try await clientTokenRun(client, 10_000) }
for _ in 0..<tokenRuns {
    rawTokens.append(raw.tokenRun(settings.tokens))
    clientTokens.append(try await clientTokenRun(client, settings.tokens))
}
await client.shutdown()
raw.close()

let ping = (client: median(clientPings) * 1e6, raw: median(rawPings) * 1e6)
let tokens = (client: median(clientTokens), raw: median(rawTokens))
let ratio = ping.client / ping.raw
func fmt(_ value: Double, _ digits: Int = 1) -> String { String(format: "%.\(digits)f", value) }

print("""
| measure | SidecarClient | raw pipes | ratio | target |
|---|---|---|---|---|
| ping round trip, median µs (\(settings.runs) runs x \(settings.pings)) | \(fmt(ping.client)) | \(fmt(ping.raw)) | \(fmt(ratio, 3)) | <= 1.050 |
| $/token events/s to user code (\(settings.tokens) per run) | \(fmt(tokens.client, 0)) | \(fmt(tokens.raw, 0)) | \(fmt(tokens.client / tokens.raw, 3)) | >= 50000/s |
""")
let report: JSONValue = [
    "ping_us": ["client_median": .double(ping.client), "raw_median": .double(ping.raw), "ratio": .double(ratio),
                "client_runs": .array(clientPings.map { .double($0 * 1e6) }), "raw_runs": .array(rawPings.map { .double($0 * 1e6) }),
                "pings_per_run": .int(settings.pings)],
    "tokens_per_s": tokenRuns == 0 ? nil : ["client_median": .double(tokens.client), "raw_median": .double(tokens.raw),
                     "client_runs": .array(clientTokens.map(JSONValue.double)), "raw_runs": .array(rawTokens.map(JSONValue.double)),
                     "tokens_per_run": .int(settings.tokens)],
    "targets": ["ping_ratio_max": 1.05, "tokens_per_s_min": 50000],
    "met": ["ping": .bool(ratio <= 1.05), "tokens": tokenRuns == 0 ? nil : .bool(tokens.client >= 50_000)],
]
print(report)
if let path = settings.json { try Data(report.description.utf8).write(to: URL(fileURLWithPath: path)) }
