import Foundation

/// How to spawn the sidecar and talk to it.
public struct SidecarConfiguration: Sendable {
    public var executableURL: URL
    public var arguments: [String]
    /// The child's whole environment; nil inherits this process's.
    public var environment: [String: String]?
    public var workingDirectory: URL?
    public var clientInfo = ClientInfo(name: "mlsidecar-swift", version: mlSidecarClientVersion)
    /// Sent as `capabilities.allowNetwork` in `initialize`.
    public var allowNetwork = false
    /// For spawning and `initialize` together.
    public var startTimeout: Duration = .seconds(120)
    /// The timeout of requests that do not pass their own; nil waits as long as it takes.
    public var requestTimeout: Duration?
    /// How much of the sidecar's stderr to keep for error messages.
    public var stderrTailBytes = 64 * 1024
    /// Called with each stderr line (the sidecar's logs), on a background thread.
    public var onStderrLine: (@Sendable (String) -> Void)?

    public init(executableURL: URL = URL(fileURLWithPath: "/usr/bin/env"),
                arguments: [String] = ["python3", "-m", "sidecar"],
                environment: [String: String]? = nil, workingDirectory: URL? = nil) {
        self.executableURL = executableURL
        self.arguments = arguments
        self.environment = environment
        self.workingDirectory = workingDirectory
    }

    /// `python -m sidecar <sidecarArguments>`, found on PATH; `extraEnvironment` is added to this
    /// process's environment.
    public static func python(_ python: String = "python3", sidecarArguments: [String] = [],
                              extraEnvironment: [String: String] = [:],
                              workingDirectory: URL? = nil) -> SidecarConfiguration {
        let environment = ProcessInfo.processInfo.environment.merging(extraEnvironment) { _, new in new }
        return SidecarConfiguration(arguments: [python, "-m", "sidecar"] + sidecarArguments,
                                    environment: environment, workingDirectory: workingDirectory)
    }
}
