import Foundation

/// One running sidecar: its process and the table of requests waiting for an answer.
final class Connection: @unchecked Sendable {
    let process: ChildProcess
    private let lock = NSLock()
    private var pending: [RequestID: ResponseChannel] = [:]
    private var nextID = 1
    private var exitValue: ProcessExit?
    private var messageLimit = 16 * 1024 * 1024
    private let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .withoutEscapingSlashes
        return encoder
    }()

    init(_ configuration: SidecarConfiguration) throws {
        let router = Router()
        process = try ChildProcess(configuration, onLine: { router.connection?.receive($0) },
                                   onExit: { router.connection?.exited($0) })
        router.connection = self
        // A process that died at once may have reported it before the router was set.
        if let exit = process.exit { exited(exit) }
    }

    deinit { process.closeInput() }

    var exit: ProcessExit? { lock.withLock { exitValue } }
    var maxMessageBytes: Int {
        get { lock.withLock { messageLimit } }
        set { lock.withLock { messageLimit = newValue } }
    }

    /// Sends a request; its answer arrives through the returned channel.
    func start<Params: Encodable>(_ method: String, params: Params?, timeout: Duration?) -> ResponseChannel {
        let (id, exit, limit): (RequestID, ProcessExit?, Int) = lock.withLock {
            defer { nextID += 1 }
            return (RequestID.int(nextID), exitValue, messageLimit)
        }
        if let exit { return .failed(SidecarError.processExited(exit), id: id, method: method) }
        let line: Data
        do {
            line = try encode(OutgoingMessage(id: id, method: method, params: params))
        } catch {
            return .failed(error, id: id, method: method)
        }
        if line.count - 1 > limit {
            return .failed(SidecarError.messageTooLarge(method: method, bytes: line.count - 1, limit: limit), id: id, method: method)
        }
        let channel = ResponseChannel(id: id, method: method) { [weak self] in self?.cancel(id) }
        let dead: ProcessExit? = lock.withLock {
            if exitValue == nil { pending[id] = channel }
            return exitValue
        }
        if let dead { return .failed(SidecarError.processExited(dead), id: id, method: method) }
        if let timeout {
            channel.setTimer(Task { [weak self, weak channel] in
                try? await Task.sleep(for: timeout)
                guard !Task.isCancelled, let channel else { return }
                self?.timedOut(channel, after: timeout)
            })
        }
        do {
            try process.write(line, method: method)
        } catch {
            // EPIPE mostly means the process is exiting, and its exit status and stderr say more:
            // if it exits soon, `exited` fails the request with them.
            Task { [weak self] in
                guard let self, await process.waitForExit(timeout: .seconds(1)) == nil else { return }
                finish(id, with: .failure(error))
            }
        }
        return channel
    }

    func notify<Params: Encodable>(_ method: String, params: Params?) throws {
        try process.write(try encode(OutgoingMessage(id: nil, method: method, params: params)), method: method)
    }

    // ----- called by the reader thread

    private let decoder = JSONDecoder()

    private func receive(_ line: Data) {
        if let id = responseID(line) { return finish(id, with: .response(line)) }
        if let token = tokenEvent(line) { return route(.token(token)) }
        guard let message = try? decoder.decode(IncomingMessage.self, from: line) else { return }
        switch message.body {
        case .event(let event):
            route(event)
        case .response(let id):
            finish(id, with: .response(line))
        case .other:
            break
        }
    }

    /// Every request still waiting fails with the exit status and the stderr tail.
    private func exited(_ exit: ProcessExit) {
        let waiting: [ResponseChannel] = lock.withLock {
            exitValue = exit
            defer { pending = [:] }
            return Array(pending.values)
        }
        for channel in waiting { channel.push(.failure(SidecarError.processExited(exit))) }
    }

    // ----- helpers

    private func route(_ event: SidecarEvent) {
        lock.withLock { pending[event.requestID] }?.push(.event(event))
    }

    private func finish(_ id: RequestID, with item: ResponseChannel.Item) {
        lock.withLock { pending.removeValue(forKey: id) }?.push(item)
    }

    private func cancel(_ id: RequestID) {
        try? notify("$/cancel", params: CancelParams(id: id))
    }

    private func timedOut(_ channel: ResponseChannel, after timeout: Duration) {
        channel.cancel()
        finish(channel.id, with: .failure(SidecarError.timeout(method: channel.method, after: timeout)))
    }

    private func encode(_ message: some Encodable) throws -> Data {
        var line = try encoder.encode(message)
        line.append(0x0A)
        return line
    }

    /// Lets the process's callbacks reach the connection without keeping it alive.
    private final class Router: @unchecked Sendable {
        weak var connection: Connection?
    }
}
