/// The open string enums of the generated code: known values are static members, and a value a
/// newer sidecar sends still decodes (compare with `==` or `switch`).
public protocol StringEnum: RawRepresentable, Codable, Hashable, Sendable, ExpressibleByStringLiteral,
    CustomStringConvertible where RawValue == String
{
    init(rawValue: String)
}

extension StringEnum {
    public init(stringLiteral value: String) { self.init(rawValue: value) }
    public var description: String { rawValue }
}

extension RequestID: CustomStringConvertible {
    public var description: String {
        switch self {
        case .int(let v): String(v)
        case .string(let v): "\"\(v)\""
        }
    }
}

/// The version of this Swift client, sent as `clientInfo.version`.
public let mlSidecarClientVersion = "0.1.0"
