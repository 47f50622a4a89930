// sidecar-chat: a command-line chat over the sidecar, streaming the model's replies.
//
//   swift run sidecar-chat [--model builtin:tiny] [--adapter ID] [--max-tokens 200] [--python python3]
//
// Type a message and press return; an empty line is ignored, `/reset` forgets the conversation,
// `/quit` or end of input (Ctrl-D) stops. Ctrl-C while a reply streams cancels that reply.
import Foundation
import MLSidecar

struct Options {
    var model = "builtin:tiny"
    var adapter: String?
    var maxTokens = 200
    var python = "python3"

    init(_ arguments: [String]) {
        var rest = arguments[...]
        while let flag = rest.popFirst() {
            guard let value = rest.popFirst() else { Options.usage("\(flag) needs a value") }
            switch flag {
            case "--model": model = value
            case "--adapter": adapter = value
            case "--max-tokens": maxTokens = Int(value) ?? { Options.usage("--max-tokens takes a number") }()
            case "--python": python = value
            default: Options.usage("unknown option \(flag)")
            }
        }
    }

    static func usage(_ problem: String) -> Never {
        FileHandle.standardError.write(Data("sidecar-chat: \(problem)\nusage: sidecar-chat [--model M] [--adapter ID] [--max-tokens N] [--python PY]\n".utf8))
        exit(2)
    }
}

/// Ctrl-C cancels the reply in progress instead of killing the chat.
final class Interrupts: @unchecked Sendable {
    private let source = DispatchSource.makeSignalSource(signal: SIGINT)
    private let lock = NSLock()
    private var current: Task<Void, Never>?

    init() {
        signal(SIGINT, SIG_IGN)
        source.setEventHandler { [self] in
            if let task = lock.withLock({ current }) { task.cancel() } else { Foundation.exit(130) }
        }
        source.resume()
    }

    func run(_ work: @escaping @Sendable () async -> Void) async {
        let task = Task { await work() }
        lock.withLock { current = task }
        await task.value
        lock.withLock { current = nil }
    }
}

func say(_ text: String) {
    FileHandle.standardOutput.write(Data(text.utf8))
}

let options = Options(Array(CommandLine.arguments.dropFirst()))
let client = SidecarClient(configuration: .python(options.python))
let interrupts = Interrupts()
do {
    let info = try await client.start()
    say("mlsidecar \(info.serverInfo.version) (pid \(info.serverInfo.pid)); loading \(options.model)...\n")
    _ = try await client.modelsLoad(ModelsLoadParams(model: options.model), timeout: .seconds(600)).result { event in
        if case .progress(let p) = event, let step = p.step, let total = p.total { say("\r\(p.stage) \(step)/\(total)   ") }
    }
    say("\rready: type a message, /reset or /quit\n")
} catch {
    FileHandle.standardError.write(Data("sidecar-chat: \(error)\n".utf8))
    await client.shutdown()
    exit(1)
}

let history = LockedHistory()
while true {
    say("> ")
    guard let line = readLine() else { break }
    let text = line.trimmingCharacters(in: .whitespaces)
    if text.isEmpty { continue }
    if text == "/quit" { break }
    if text == "/reset" { history.reset(); continue }
    history.append(ChatMessage(role: "user", content: text))
    let params = GenerateParams(model: options.model, adapters: options.adapter.map { [AdapterRef(adapter: $0)] },
                                maxTokens: options.maxTokens, messages: history.messages)
    await interrupts.run {
        do {
            let reply = try await client.generate(params).result { event in
                if case .token(let token) = event { say(token.text) }
            }
            history.append(ChatMessage(role: "assistant", content: reply.text))
            say("\n")
        } catch let error as SidecarError where error.isCancelled {
            say(" [cancelled]\n")
        } catch {
            say("\nerror: \(error)\n")
        }
    }
    if await !client.isRunning { break }
}
await client.shutdown()

/// The conversation so far, shared with the reply task.
final class LockedHistory: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: [ChatMessage] = []
    var messages: [ChatMessage] { lock.withLock { stored } }
    func append(_ message: ChatMessage) { lock.withLock { stored.append(message) } }
    func reset() { lock.withLock { stored = [] } }
}
