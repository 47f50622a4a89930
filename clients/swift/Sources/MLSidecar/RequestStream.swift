import Foundation

/// What a request stream yields: its events, then its result as the last element.
public enum RequestUpdate<Value: Sendable>: Sendable {
    case event(SidecarEvent)
    case result(Value)
}

/// The events and the result of one request, as an async sequence: it yields `.event`s, then
/// `.result` and ends, or throws the request's error (`SidecarError`).
///
/// Cancelling the task that iterates it sends `$/cancel` and keeps listening, so the stream then
/// throws the sidecar's -32800 error with its `partial` data (the plain `AsyncThrowingStream`
/// would end silently and lose it). Dropping the stream before its end also cancels the request.
/// One consumer per stream.
public struct RequestStream<Value: Decodable & Sendable>: AsyncSequence, Sendable {
    public typealias Element = RequestUpdate<Value>
    public typealias Failure = any Error

    /// Cancels the request when the last copy of the stream and its iterator are gone.
    final class Handle: Sendable {
        let channel: ResponseChannel
        init(_ channel: ResponseChannel) { self.channel = channel }
        deinit { channel.dropped() }
    }

    private let handle: Handle

    init(_ channel: ResponseChannel) { handle = Handle(channel) }

    /// The id this client gave the request.
    public var id: RequestID { handle.channel.id }

    /// Sends `$/cancel`; the stream then ends with the cancelled error (or the result, if it won).
    public func cancel() { handle.channel.cancel() }

    public func makeAsyncIterator() -> Iterator { Iterator(handle: handle) }

    public struct Iterator: AsyncIteratorProtocol, Sendable {
        let handle: Handle
        private var batch: [ResponseChannel.Item] = []
        private var index = 0
        private var done = false

        init(handle: Handle) { self.handle = handle }

        public mutating func next() async throws -> RequestUpdate<Value>? {
            guard !done else { return nil }
            if index == batch.count {
                batch = await handle.channel.take()
                index = 0
                if batch.isEmpty { done = true; return nil }
            }
            let item = batch[index]
            index += 1
            if case .event(let event) = item { return .event(event) }
            done = true
            return .result(try MLSidecar.result(of: item, as: Value.self, method: handle.channel.method))
        }
    }

    /// Waits for the result, passing each event to `onEvent`.
    /// (It reads the mailbox directly, not through the iterator: fewer generic types to look up
    /// per call, which a `ping` round trip notices.)
    public func result(isolation: isolated (any Actor)? = #isolation,
                       onEvent: (SidecarEvent) async throws -> Void = { _ in }) async throws -> Value {
        let channel = handle.channel
        while true {
            let batch = await channel.take()
            for item in batch {
                if case .event(let event) = item {
                    try await onEvent(event)
                } else {
                    return try MLSidecar.result(of: item, as: Value.self, method: channel.method)
                }
            }
            if batch.isEmpty { break }
        }
        throw SidecarError.invalidResponse(method: channel.method, reason: "the stream ended without a result")
    }
}
