import Foundation
import MLSidecar

/// How the tests spawn the real sidecar: from this checkout, in one shared home (so builtin:tiny
/// is built once per run), offline and with quiet OpenMP threads.
enum Sidecars {
    static let repoRoot: URL = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<5 { url.deleteLastPathComponent() }  // Tests/MLSidecarTests/Support.swift in clients/swift
        return url
    }()

    /// MLSIDECAR_TEST_HOME reuses a home across runs; by default a fresh temporary one.
    static let home: URL = {
        if let path = ProcessInfo.processInfo.environment["MLSIDECAR_TEST_HOME"] { return URL(fileURLWithPath: path) }
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("mlsidecar-swift-tests-\(UUID().uuidString)")
        try? FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        atexit { try? FileManager.default.removeItem(at: Sidecars.home) }
        return url
    }()

    static let python = ProcessInfo.processInfo.environment["MLSIDECAR_PYTHON"] ?? "python3"

    static func configuration(debug: Bool = false) -> SidecarConfiguration {
        .python(python, sidecarArguments: debug ? ["--debug"] : [], extraEnvironment: [
            "MLSIDECAR_HOME": home.path, "HF_HUB_OFFLINE": "1", "PYTHONPATH": repoRoot.path,
            "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
        ], workingDirectory: repoRoot)
    }

    static func started(debug: Bool = false) async throws -> SidecarClient {
        let client = SidecarClient(configuration: configuration(debug: debug))
        try await client.start()
        return client
    }

    /// A configuration that runs a Python script instead of the sidecar (a fake server).
    static func fake(_ script: String) -> SidecarConfiguration {
        SidecarConfiguration(arguments: [python, "-c", script])
    }

    /// builtin:tiny is built on its first load in a fresh home (10-60 s, more on a busy machine).
    static func tinyModel() async throws { try await tinyModelBuilt.value }

    private static let tinyModelBuilt = Task<Void, any Error> {
        let client = try await started()
        _ = try await client.modelsLoad(ModelsLoadParams(model: "builtin:tiny"), timeout: .seconds(300)).result()
        await client.shutdown()
    }
}
