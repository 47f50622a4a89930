// CoreMLChat: runs a package made by mlsidecar's `export` (format coreml) with Core ML alone.
//
//   swift run CoreMLChat <artifact dir or .mlpackage> [--ids 1,2,3] [--max-tokens 32] [--embed]
//
// The package holds up to three functions that share one copy of the weights: `prefill` (a fixed
// chunk of tokens), `decode` (one token) and `embed`. Each is loaded as its own MLModel
// (MLModelConfiguration.functionName); one state (the KV cache, `key_cache` and `value_cache`)
// made by the prefill model is passed to both prefill and decode. Every input is an int32
// MLMultiArray: the causal mask is built inside the graph. Token ids come from the command line
// (a Foundation-only sample has no tokenizer); the generated ids are shown with their pieces from
// tokenizer.json beside the package.
//
// Compiled only where Core ML exists; elsewhere it says so and exits.

#if canImport(CoreML)
import CoreML
import Foundation

struct Options {
    var package: URL
    var ids: [Int32] = [1, 2, 3, 4, 5]
    var maxTokens = 32
    var embed = false
}

func parseOptions() -> Options? {
    var args = Array(CommandLine.arguments.dropFirst())
    guard let first = args.first, !first.hasPrefix("--") else { return nil }
    args.removeFirst()
    var url = URL(fileURLWithPath: first)
    if url.pathExtension != "mlpackage",
       let inside = try? FileManager.default.contentsOfDirectory(atPath: url.path).first(where: { $0.hasSuffix(".mlpackage") }) {
        url = url.appendingPathComponent(inside)  // an artifact directory: its package
    }
    var options = Options(package: url)
    while let flag = args.first {
        args.removeFirst()
        switch flag {
        case "--ids": options.ids = (args.first ?? "").split(separator: ",").compactMap { Int32($0) }; args = Array(args.dropFirst())
        case "--max-tokens": options.maxTokens = Int(args.first ?? "") ?? 32; args = Array(args.dropFirst())
        case "--embed": options.embed = true
        default: return nil
        }
    }
    return options
}

/// The int32 arrays every function takes.
func int32Array(_ values: [Int32], shape: [Int]) throws -> MLMultiArray {
    let array = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .int32)
    array.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, _ in
        for index in 0..<buffer.count { buffer[index] = index < values.count ? values[index] : 0 }
    }
    return array
}

func floats(_ value: MLFeatureValue?) -> [Float] {
    guard let array = value?.multiArrayValue else { return [] }
    return array.withUnsafeBufferPointer(ofType: Float.self) { Array($0) }  // outputs are float32
}

func argmax(_ values: [Float]) -> Int32 {
    var best = 0
    for index in values.indices where values[index] > values[best] { best = index }
    return Int32(best)
}

/// Token pieces from tokenizer.json (model.vocab), for display only.
func pieces(near package: URL) -> [Int32: String] {
    let file = package.deletingLastPathComponent().appendingPathComponent("tokenizer.json")
    guard let data = try? Data(contentsOf: file),
          let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
          let model = json["model"] as? [String: Any], let vocab = model["vocab"] as? [String: Int] else { return [:] }
    var out: [Int32: String] = [:]
    for (piece, id) in vocab { out[Int32(id)] = piece.replacingOccurrences(of: "\u{0120}", with: " ") }
    return out
}

/// Shape of a function's input, read from the model description (prefill's chunk length).
func inputLength(_ model: MLModel, _ name: String) -> Int {
    model.modelDescription.inputDescriptionsByName[name]?.multiArrayConstraint?.shape.last?.intValue ?? 1
}

@available(macOS 15.0, iOS 18.0, *)
func run(_ options: Options) async throws {
    let compiled = try await MLModel.compileModel(at: options.package)
    func load(_ function: String) async throws -> MLModel {
        let configuration = MLModelConfiguration()
        configuration.functionName = function
        configuration.computeUnits = .all
        return try await MLModel.load(contentsOf: compiled, configuration: configuration)
    }
    let names = pieces(near: options.package)
    let prefill = try await load("prefill")
    let decode = try await load("decode")
    let chunk = inputLength(prefill, "input_ids")
    let context = prefill.modelDescription.stateDescriptionsByName["key_cache"]?.stateConstraint?.bufferShape[2].intValue ?? 0
    let state = prefill.makeState()

    // Prefill in chunks; a chunk must end inside the cache, so the last one starts at most at
    // context - chunk (positions written again get the same keys and values).
    var done = 0
    var logits: [Float] = []
    while done < options.ids.count {
        let start = min(done, context - chunk)
        let piece = Array(options.ids[start..<min(start + chunk, options.ids.count)])
        let inputs = try MLDictionaryFeatureProvider(dictionary: [
            "input_ids": MLFeatureValue(multiArray: try int32Array(piece, shape: [1, chunk])),
            "position": MLFeatureValue(multiArray: try int32Array([Int32(start)], shape: [1])),
            "length": MLFeatureValue(multiArray: try int32Array([Int32(piece.count)], shape: [1])),
        ])
        logits = floats(try await prefill.prediction(from: inputs, using: state).featureValue(for: "logits"))
        done = start + piece.count
    }

    // Greedy decode, one token per call, the same state.
    var position = options.ids.count
    var generated: [Int32] = []
    while generated.count < options.maxTokens && position < context {
        let next = argmax(logits)
        generated.append(next)
        print(names[next] ?? "<\(next)>", terminator: "")
        fflush(stdout)
        let inputs = try MLDictionaryFeatureProvider(dictionary: [
            "input_ids": MLFeatureValue(multiArray: try int32Array([next], shape: [1, 1])),
            "position": MLFeatureValue(multiArray: try int32Array([Int32(position)], shape: [1])),
        ])
        logits = floats(try await decode.prediction(from: inputs, using: state).featureValue(for: "logits"))
        position += 1
    }
    print("\ngenerated ids: \(generated.map(String.init).joined(separator: ","))")

    if options.embed {
        let embed = try await load("embed")
        let length = inputLength(embed, "input_ids")
        let ids = Array(options.ids.prefix(length))
        let inputs = try MLDictionaryFeatureProvider(dictionary: [
            "input_ids": MLFeatureValue(multiArray: try int32Array(ids, shape: [1, length])),
            "length": MLFeatureValue(multiArray: try int32Array([Int32(ids.count)], shape: [1])),
        ])
        let vector = floats(try await embed.prediction(from: inputs).featureValue(for: "embedding"))
        let norm = vector.reduce(0) { $0 + $1 * $1 }.squareRoot()
        print("embedding: \(vector.count) values, |v| = \(norm), first: \(vector.prefix(4).map { String(format: "%.4f", $0) })")
    }
}

guard let options = parseOptions() else {
    print("usage: CoreMLChat <artifact dir or .mlpackage> [--ids 1,2,3] [--max-tokens 32] [--embed]")
    exit(2)
}
if #available(macOS 15.0, iOS 18.0, *) {
    do {
        try await run(options)
    } catch {
        print("error: \(error)")
        exit(1)
    }
} else {
    print("the package uses Core ML states and multifunction models: macOS 15 / iOS 18 or later")
    exit(1)
}
#else
print("CoreMLChat needs Core ML (macOS 15 / iOS 18 or later); this platform has none.")
#endif
