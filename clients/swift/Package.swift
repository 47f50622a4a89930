// swift-tools-version: 6.0
// The Swift client of the mlsidecar ML sidecar: Foundation only, no dependencies.
import PackageDescription

let package = Package(
    name: "MLSidecar",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "MLSidecar", targets: ["MLSidecar"]),
        .executable(name: "sidecar-chat", targets: ["sidecar-chat"]),
        .executable(name: "sidecar-bench", targets: ["sidecar-bench"]),
    ],
    targets: [
        .target(name: "MLSidecar"),
        // Examples and benchmarks; more samples (e.g. Core ML, guarded by `#if canImport(CoreML)`)
        // are added the same way, one executable target per folder under Sources/.
        .executableTarget(name: "sidecar-chat", dependencies: ["MLSidecar"]),
        .executableTarget(name: "sidecar-bench", dependencies: ["MLSidecar"]),
        .executableTarget(name: "CoreMLChat", path: "Samples/CoreMLChat"),
        .testTarget(name: "MLSidecarTests", dependencies: ["MLSidecar"]),
    ],
    swiftLanguageModes: [.v6]
)
