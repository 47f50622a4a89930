import Foundation

/// Every error the client throws.
public enum SidecarError: Error, Sendable, CustomStringConvertible {
    /// The sidecar answered the request with an error (see `RPCError.code` and `.kind`).
    case rpc(RPCError)
    /// The sidecar process ended while the request was pending (or before it was sent).
    case processExited(ProcessExit)
    /// No sidecar is running: call `start()` first.
    case notRunning
    /// `start()` was called while a sidecar is running.
    case alreadyRunning
    /// The executable could not be spawned.
    case launchFailed(String)
    /// Writing to the sidecar's stdin failed (EPIPE: it closed its input or died).
    case writeFailed(errno: Int32, method: String)
    /// No response within the request's timeout; `$/cancel` was sent.
    case timeout(method: String, after: Duration)
    /// The sidecar does not speak this client's protocol version.
    case unsupportedProtocolVersion(requested: String, supported: [String])
    /// The request is larger than the sidecar's `maxMessageBytes`: send bulk data as a file path.
    case messageTooLarge(method: String, bytes: Int, limit: Int)
    /// A response that does not decode as the expected type.
    case invalidResponse(method: String, reason: String)

    /// The sidecar's error, when it sent one.
    public var rpcError: RPCError? { if case .rpc(let error) = self { error } else { nil } }
    /// True for a request that ended because it was cancelled (-32800).
    public var isCancelled: Bool { rpcError?.code == .cancelled }

    public var description: String {
        switch self {
        case .rpc(let error): error.description
        case .processExited(let exit): "the sidecar \(exit)"
        case .notRunning: "the sidecar is not running: call start() first"
        case .alreadyRunning: "the sidecar is already running: call shutdown() before start()"
        case .launchFailed(let reason): "could not start the sidecar: \(reason)"
        case .writeFailed(let code, let method):
            "could not send \(method) to the sidecar: \(String(cString: strerror(code))) (it closed its input or exited)"
        case .timeout(let method, let after): "\(method) got no answer within \(after); it was cancelled"
        case .unsupportedProtocolVersion(let requested, let supported):
            "the sidecar speaks protocol \(supported.joined(separator: ", ")), this client \(requested): "
                + "install matching versions of the sidecar and the client"
        case .messageTooLarge(let method, let bytes, let limit):
            "\(method) is \(bytes) bytes, over the sidecar's maxMessageBytes (\(limit)): send bulk data as a file path"
        case .invalidResponse(let method, let reason): "the answer to \(method) did not decode: \(reason)"
        }
    }
}

/// An error response from the sidecar, with accessors for the data shapes the protocol fixes.
public struct RPCError: Error, Hashable, Sendable, CustomStringConvertible {
    public let code: ErrorCode
    public let message: String
    public let data: JSONValue?
    /// The method of the request that failed.
    public let method: String

    public init(code: ErrorCode, message: String, data: JSONValue?, method: String) {
        self.code = code
        self.message = message
        self.data = data
        self.method = method
    }

    /// `data.kind` of a -32803 "request failed" error.
    public var kind: ErrorKind? { data?["kind"]?.stringValue.map(ErrorKind.init(rawValue:)) }
    /// Whether trying again may work (busy, out of memory, a crashed worker).
    public var retryable: Bool { data?["retryable"]?.boolValue ?? (code == .busy) }
    /// `data.detail` of a -32803 error.
    public var detail: JSONValue? { data?["detail"] }
    /// `data.partial` of a -32800 "cancelled" error: what the request finished before it stopped.
    public var partial: JSONValue? { data?["partial"] }
    /// `data.field` of a -32602 "invalid params" error.
    public var field: String? { data?["field"]?.stringValue }

    public var description: String {
        "\(method) failed: \(message) (\(code.rawValue)\(kind.map { " \($0)" } ?? ""))"
    }
}

/// How the sidecar process ended.
public struct ProcessExit: Hashable, Sendable, CustomStringConvertible {
    /// The exit code, or the signal number when `signal` is true.
    public let status: Int32
    /// True when the process was killed by signal `status`.
    public let signaled: Bool
    /// The last bytes the process wrote to stderr.
    public let stderrTail: String

    public init(status: Int32, signaled: Bool, stderrTail: String) {
        self.status = status
        self.signaled = signaled
        self.stderrTail = stderrTail
    }

    public var description: String {
        let how = signaled ? "was killed by signal \(status)" : "exited with code \(status)"
        let tail = stderrTail.split(separator: "\n").suffix(20).joined(separator: "\n")
        return tail.isEmpty ? how : "\(how); the end of its stderr:\n\(tail)"
    }
}
