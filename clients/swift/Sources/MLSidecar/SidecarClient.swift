import Foundation

/// A client of one sidecar process at a time: spawns it, shakes hands, sends requests and routes
/// their events and answers. After the process died, `start()` spawns a new one.
///
/// ```swift
/// let client = SidecarClient(configuration: .python())
/// try await client.start()
/// for try await update in await client.generate(GenerateParams(model: "builtin:tiny", prompt: "Once")) {
///     if case .event(.token(let token)) = update { print(token.text, terminator: "") }
/// }
/// await client.shutdown()
/// ```
public actor SidecarClient {
    public nonisolated let configuration: SidecarConfiguration
    private var connection: Connection?
    /// The sidecar's answer to `initialize`: its version, methods and limits.
    public private(set) var serverInfo: InitializeResult?

    public init(configuration: SidecarConfiguration = SidecarConfiguration()) {
        self.configuration = configuration
    }

    /// True from `start()` until the process exits.
    public var isRunning: Bool { connection.map { $0.exit == nil } ?? false }
    /// The sidecar's pid, while one was started.
    public var processIdentifier: Int32? { connection?.process.pid }
    /// How the last process ended, once it did.
    public var exit: ProcessExit? { connection?.exit }
    /// The last bytes the sidecar wrote to stderr (its logs).
    public var stderrTail: String { connection?.process.stderr.text ?? "" }

    /// Spawns the sidecar and sends `initialize` with this client's protocol version.
    @discardableResult
    public func start() async throws -> InitializeResult {
        if isRunning { throw SidecarError.alreadyRunning }
        let connection = try Connection(configuration)
        self.connection = connection
        serverInfo = nil
        let params = InitializeParams(protocolVersion: SidecarProtocol.version,
                                      capabilities: ClientCapabilities(allowNetwork: configuration.allowNetwork),
                                      clientInfo: configuration.clientInfo, processId: Int(getpid()))
        do {
            let info = try await request("initialize", params: params, as: InitializeResult.self,
                                         timeout: configuration.startTimeout).result()
            guard info.protocolVersion == SidecarProtocol.version else {
                throw SidecarError.unsupportedProtocolVersion(requested: SidecarProtocol.version, supported: [info.protocolVersion])
            }
            connection.maxMessageBytes = info.capabilities.maxMessageBytes
            serverInfo = info
            return info
        } catch {
            _ = await connection.process.stop(grace: .seconds(2))
            throw Self.handshakeError(error)
        }
    }

    /// Sends a request with typed params and result. Errors (also "not running") come out of the
    /// stream; `timeout` defaults to `configuration.requestTimeout`.
    public func request<Params: Encodable & Sendable, Value: Decodable & Sendable>(
        _ method: String, params: Params, as type: Value.Type = Value.self, timeout: Duration? = nil
    ) -> RequestStream<Value> {
        send(method, params: params, timeout: timeout)
    }

    /// Sends any request as JSON, for methods this client has no types for (nil params are left out).
    public func request(method: String, params: JSONValue? = nil, timeout: Duration? = nil) -> RequestStream<JSONValue> {
        send(method, params: params, timeout: timeout)
    }

    private func send<Params: Encodable, Value: Decodable & Sendable>(_ method: String, params: Params?,
                                                                      timeout: Duration?) -> RequestStream<Value> {
        guard let connection else {
            return RequestStream(.failed(SidecarError.notRunning, id: 0, method: method))
        }
        return RequestStream(connection.start(method, params: params, timeout: timeout ?? configuration.requestTimeout))
    }

    /// Sends a notification (no answer).
    public func notify(method: String, params: JSONValue? = nil) throws {
        guard let connection else { throw SidecarError.notRunning }
        try connection.notify(method, params: params)
    }

    /// Stops the sidecar cleanly: `shutdown` (running jobs are cancelled and answered), close its
    /// stdin, wait for it to exit; then SIGTERM, then SIGKILL. Returns how it ended.
    @discardableResult
    public func shutdown(timeout: Duration = .seconds(15)) async -> ProcessExit? {
        guard let connection else { return nil }
        if connection.exit == nil {
            _ = try? await request("shutdown", params: Empty(), as: ShutdownResult.self, timeout: timeout).result()
        }
        return await connection.process.stop(grace: timeout)
    }

    private static func handshakeError(_ error: any Error) -> any Error {
        if case .rpc(let rpc) = error as? SidecarError, rpc.code == .invalidParams,
           let supported = rpc.data?["supported"]?.arrayValue {
            return SidecarError.unsupportedProtocolVersion(requested: SidecarProtocol.version,
                                                           supported: supported.compactMap(\.stringValue))
        }
        return error
    }
}
