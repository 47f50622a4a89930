import Foundation
import Testing
@testable import MLSidecar

/// End-to-end tests against the real sidecar (`python3 -m sidecar` from this checkout), one at a
/// time: the machines they run on are small.
@Suite(.serialized, .timeLimit(.minutes(10)))
struct SidecarTests {
    @Test func handshakePingStatusAndShutdown() async throws {
        let client = SidecarClient(configuration: Sidecars.configuration())
        let info = try await client.start()
        #expect(info.protocolVersion == SidecarProtocol.version)
        #expect(info.serverInfo.name == "mlsidecar")
        #expect(info.serverInfo.pid == Int(await client.processIdentifier ?? -1))
        _ = try await client.ping().result()
        let status = try await client.status().result()
        #expect(status.jobs.isEmpty)
        await #expect(throws: SidecarError.self) { try await client.start() }

        let exit = try #require(await client.shutdown())
        #expect(exit.status == 0 && !exit.signaled)
        #expect(await !client.isRunning)
        await #expect { try await client.ping().result() } throws: { error in
            if case .processExited = error as? SidecarError { true } else { false }
        }
    }

    @Test func generateStreamsTokensBeforeTheResult() async throws {
        try await Sidecars.tinyModel()
        let client = try await Sidecars.started()
        var tokens: [TokenEvent] = []
        var result: GenerateResult?
        let params = GenerateParams(model: "builtin:tiny", maxTokens: 24, prompt: "Once upon a time", seed: 1, temperature: 0)
        for try await update in await client.generate(params, timeout: .seconds(300)) {
            switch update {
            case .event(.token(let token)):
                #expect(result == nil, "a token after the result")
                tokens.append(token)
            case .event: break
            case .result(let value): result = value
            }
        }
        let final = try #require(result)
        #expect(!tokens.isEmpty)
        #expect(tokens.map(\.seq) == Array(0..<tokens.count))
        #expect(tokens.map(\.text).joined() == final.text)
        #expect(final.usage.completionTokens > 0)
        await client.shutdown()
    }

    @Test func taskCancellationSendsCancelAndReturnsThePartial() async throws {
        try await Sidecars.tinyModel()
        let client = try await Sidecars.started()
        let stream = await client.generate(GenerateParams(model: "builtin:tiny", ignoreEos: true, maxTokens: 100_000,
                                                          prompt: "Once upon a time"))
        let (fiveTokens, signal) = AsyncStream<Void>.makeStream()
        let received = LockedValue("")
        let consumer = Task {
            var count = 0
            for try await update in stream {
                if case .event(.token(let token)) = update {
                    received.value += token.text
                    count += 1
                    if count == 5 { signal.yield() }
                }
            }
        }
        for await _ in fiveTokens { break }
        consumer.cancel()
        let outcome = await consumer.result
        guard case .failure(let error) = outcome, let rpc = (error as? SidecarError)?.rpcError else {
            Issue.record("expected the cancelled error, got \(outcome)")
            return
        }
        #expect(rpc.code == .cancelled)
        let partial = try #require(rpc.partial?["text"]?.stringValue)
        #expect(partial.hasPrefix(received.value) && !received.value.isEmpty)
        #expect(rpc.partial?["usage"]?["completion_tokens"]?.intValue ?? 0 >= 5)
        _ = try await client.ping().result()  // still serving
        await client.shutdown()
    }

    @Test func droppingAStreamCancelsItsRequest() async throws {
        let client = try await Sidecars.started(debug: true)
        for try await update in await client.debugStream(DebugStreamParams(count: 100_000, delayMs: 5)) {
            if case .event(.token) = update { break }
        }
        var jobs: [JobInfo] = []
        for _ in 0..<50 {
            jobs = try await client.status().result().jobs
            if jobs.isEmpty { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(jobs.isEmpty, "the abandoned debug/stream is still running")
        await client.shutdown()
    }

    @Test func unicodeTokensArriveIntact() async throws {
        let client = try await Sidecars.started(debug: true)
        let text = "日本😀\u{2028}é 🦊\u{2029}\u{85}\r語 "
        var texts: [String] = []
        let result = try await client.debugStream(DebugStreamParams(count: 200, text: text)).result { event in
            if case .token(let token) = event { texts.append(token.text) }
        }
        #expect(texts == Array(repeating: text, count: 200))
        #expect(result.text == text && result.count == 200)
        await client.shutdown()
    }

    @Test func killedSidecarFailsPendingRequestsAndCanRestart() async throws {
        let client = try await Sidecars.started(debug: true)
        let sleeping = await client.debugSleep(DebugSleepParams(seconds: 120, steps: 1200, writeStdout: true))
        let streaming = await client.debugStream(DebugStreamParams(count: 1_000_000, delayMs: 20))
        var iterator = sleeping.makeAsyncIterator()
        guard case .event(.progress) = try await iterator.next() else { Issue.record("no progress first"); return }
        kill(try #require(await client.processIdentifier), SIGKILL)

        for exit in [try await exitOf(sleeping), try await exitOf(streaming)] {
            #expect(exit.signaled && exit.status == SIGKILL)
            #expect(exit.stderrTail.contains("debug/sleep: print() from a worker"))
            #expect("\(SidecarError.processExited(exit))".contains("killed by signal 9"))
        }
        #expect(await !client.isRunning)
        try await client.start()
        _ = try await client.ping().result()
        await client.shutdown()
    }

    private func exitOf<Value>(_ stream: RequestStream<Value>) async throws -> ProcessExit {
        do {
            for try await _ in stream {}
        } catch SidecarError.processExited(let exit) {
            return exit
        }
        throw SidecarError.invalidResponse(method: "test", reason: "request \(stream.id) did not fail with processExited")
    }

    /// Many requests in flight on one connection, answered in any order, while a stream runs:
    /// whichever task reads the pipe (the reader thread or a waiting task, see StdoutReader),
    /// every answer and event reaches its own request, in order.
    @Test func concurrentRequestsAndAStreamShareThePipe() async throws {
        let client = try await Sidecars.started(debug: true)
        let streamed = Task {
            var seqs: [Int] = []
            let result = try await client.debugStream(DebugStreamParams(count: 20_000, text: "s")).result { event in
                if case .token(let token) = event { seqs.append(token.seq) }
            }
            return (seqs, result.count)
        }
        try await withThrowingTaskGroup(of: Int.self) { group in
            for _ in 0..<8 {
                group.addTask {
                    for _ in 0..<200 { _ = try await client.ping().result() }
                    return 200
                }
            }
            group.addTask {  // small streams, each awaited as a whole
                var total = 0
                for n in 1...20 { total += try await client.debugStream(DebugStreamParams(count: n)).result().count }
                return total
            }
            var answers = 0
            for try await n in group { answers += n }
            #expect(answers == 8 * 200 + 210)
        }
        let (seqs, count) = try await streamed.value
        #expect(count == 20_000 && seqs == Array(0..<20_000))

        // A request awaited only later: its answer waits in the pipe (or its mailbox) meanwhile.
        let late = await client.ping()
        let status = await client.status()
        try await Task.sleep(for: .milliseconds(50))
        _ = try await status.result()
        _ = try await late.result()
        await client.shutdown()
    }

    @Test func twoSidecarsInOneProcess() async throws {
        async let first = Sidecars.started(debug: true)
        async let second = Sidecars.started(debug: true)
        let (a, b) = try await (first, second)
        #expect(await a.processIdentifier != b.processIdentifier)
        async let countA = a.debugStream(DebugStreamParams(count: 2000, text: "a")).result().count
        async let countB = b.debugStream(DebugStreamParams(count: 2000, text: "b")).result().count
        #expect(try await (countA, countB) == (2000, 2000))
        // Each exits on its own stdin's end, so neither holds the other's pipes.
        let exitA = await a.shutdown(timeout: .seconds(20))
        #expect(exitA?.status == 0 && exitA?.signaled == false)
        _ = try await b.ping().result()
        let exitB = await b.shutdown(timeout: .seconds(20))
        #expect(exitB?.status == 0 && exitB?.signaled == false)
    }

    @Test func trainReportsProgress() async throws {
        try await Sidecars.tinyModel()
        let client = try await Sidecars.started()
        let data = Sidecars.repoRoot.appendingPathComponent("runtimes/data/demo_chat.jsonl").path
        var progress: [ProgressEvent] = []
        let result = try await client.train(TrainParams(data: .string(data), maxSteps: 3, model: "builtin:tiny", preset: .quick),
                                            timeout: .seconds(600)).result { event in
            if case .progress(let event) = event { progress.append(event) }
        }
        #expect(progress.contains { $0.stage == "train" })
        #expect(result.metrics.steps == 3)
        #expect(result.stopped == .maxSteps)
        #expect(FileManager.default.fileExists(atPath: result.artifact.path))
        await client.shutdown()
    }

    @Test func badInputMapsToTypedErrors() async throws {
        let client = try await Sidecars.started()
        await #expect { try await client.generate(GenerateParams(model: "nope/does-not-exist", prompt: "x")).result() } throws: {
            let rpc = ($0 as? SidecarError)?.rpcError
            return rpc?.code == .requestFailed && rpc?.kind == .modelNotFound && rpc?.retryable == false
        }
        await #expect { try await client.generate(GenerateParams(model: "builtin:tiny", maxTokens: 0, prompt: "x")).result() } throws: {
            let rpc = ($0 as? SidecarError)?.rpcError
            return rpc?.code == .invalidParams && rpc?.field == "params.max_tokens"
        }
        await #expect { try await client.request(method: "no/such-method").result() } throws: {
            ($0 as? SidecarError)?.rpcError?.code == .methodNotFound
        }
        await client.shutdown()
    }

    @Test func requestTimeoutCancelsTheRequest() async throws {
        let client = try await Sidecars.started(debug: true)
        let started = ContinuousClock.now
        await #expect { try await client.debugSleep(DebugSleepParams(seconds: 30, steps: 300), timeout: .milliseconds(500)).result() } throws: {
            if case .timeout(let method, _) = $0 as? SidecarError { method == "debug/sleep" } else { false }
        }
        #expect(ContinuousClock.now - started < .seconds(10))
        _ = try await client.ping().result()
        await client.shutdown()
    }

    @Test func missingPythonFailsTheStartWithItsStderr() async throws {
        let client = SidecarClient(configuration: SidecarConfiguration(arguments: ["no-such-python-here", "-m", "sidecar"]))
        await #expect { try await client.start() } throws: { error in
            guard case .processExited(let exit) = error as? SidecarError else { return false }
            return exit.status == 127 && exit.stderrTail.contains("no-such-python-here")
        }
        #expect(await !client.isRunning)
    }

    @Test func unsupportedProtocolVersionIsAClearError() async throws {
        let script = """
        import json, sys
        for line in sys.stdin:
            m = json.loads(line)
            err = {"code": -32602, "message": "unsupported protocol version", "data": {"supported": ["1999-01-01"], "requested": m["params"]["protocolVersion"]}}
            print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "error": err}), flush=True)
        """
        let client = SidecarClient(configuration: Sidecars.fake(script))
        await #expect { try await client.start() } throws: { error in
            guard case .unsupportedProtocolVersion(let requested, let supported) = error as? SidecarError else { return false }
            return requested == SidecarProtocol.version && supported == ["1999-01-01"]
        }
        await client.shutdown()
    }

    /// A fake server that closes its stdin, then frames its one answer with a BOM and CRLF: the next
    /// write hits EPIPE, which must be an error, not a crash.
    @Test func brokenPipeIsAThrownError() async throws {
        let script = """
        import json, os, sys, time
        m = json.loads(sys.stdin.readline())
        info = {"name": "fake", "version": "0", "pid": os.getpid(), "python": "3", "torch": None, "llama_cpp": None, "coremltools": None}
        caps = {"methods": {}, "devices": [], "maxMessageBytes": 1000, "maxConcurrentJobs": 1, "maxQueuedJobs": 1}
        result = {"protocolVersion": m["params"]["protocolVersion"], "serverInfo": info, "capabilities": caps}
        line = json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": result}, ensure_ascii=False)
        os.close(0)
        os.write(1, b"\\xef\\xbb\\xbf\\r\\n" + line.encode() + b"\\r\\n")
        time.sleep(30)
        """
        let client = SidecarClient(configuration: Sidecars.fake(script))
        let info = try await client.start()
        #expect(info.serverInfo.name == "fake")
        await #expect { try await client.ping().result() } throws: {
            if case .writeFailed(let code, _) = $0 as? SidecarError { code == EPIPE } else { false }
        }
        await #expect { try await client.request(method: "x", params: ["big": .string(String(repeating: "x", count: 2000))]).result() } throws: {
            if case .messageTooLarge = $0 as? SidecarError { true } else { false }
        }
        let exit = await client.shutdown(timeout: .seconds(1))
        #expect(exit?.signaled == true && exit?.status == SIGTERM)  // SIGTERM works: not blocked in the child
    }
}
