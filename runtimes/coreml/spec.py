"""Reading a .mlpackage without Core ML: its functions' interfaces, ops and weights, on any OS.

coremltools can convert and compress on Linux but not run a model there, and its
get_weights_metadata / decompress_weights refuse multifunction packages. Everything here reads
the protobuf spec and the weight blob through coremltools' own MIL loader instead, so the tests
and the export's result can state what the package holds: each function's inputs, outputs and
states with shapes and dtypes, the ops it runs (the saved names: coreml_update_state is saved as
write_state), and the weights as float16 arrays (compressed ones decompressed by coremltools'
WeightDecompressor pass).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

_DTYPES = {65552: "float16", 65568: "float32", 131104: "int32", 65600: "float64"}
_ARRAY_DTYPES = {"FLOAT16": "float16", "FLOAT32": "float32", "INT32": "int32", "DOUBLE": "float64", "INT8": "int8"}


def weights_dir(package: Path) -> Path:
    return Path(package) / "Data" / "com.apple.CoreML" / "weights"


def _feature(feature: Any) -> dict[str, Any]:
    kind = feature.type.WhichOneof("Type")
    if kind == "stateType":
        array = feature.type.stateType.arrayType
    elif kind == "multiArrayType":
        array = feature.type.multiArrayType
    else:
        return {"name": feature.name, "type": kind}
    from coremltools.proto import FeatureTypes_pb2

    dtype = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
    shape = list(array.shape)
    entry = {"name": feature.name, "shape": shape, "dtype": _ARRAY_DTYPES.get(dtype, dtype.lower())}
    flexible = array.WhichOneof("ShapeFlexibility")
    if flexible == "enumeratedShapes":
        entry["enumerated_shapes"] = [list(s.shape) for s in array.enumeratedShapes.shapes]
    return entry


def _ops(block: Any, counts: Counter) -> None:
    for op in block.operations:
        counts[op.type] += 1
        for nested in op.blocks:
            _ops(nested, counts)


def describe(package: Path) -> dict[str, Any]:
    """What a package holds, from its spec: per function the interface and the op counts, and sizes."""
    import coremltools as ct

    package = Path(package)
    spec = ct.utils.load_spec(str(package))
    description = spec.description
    functions = {}
    entries = list(description.functions) or [description]
    names = [f.name for f in description.functions] or ["main"]
    for name, entry in zip(names, entries):
        counts: Counter = Counter()
        program_function = spec.mlProgram.functions[name]
        for block in program_function.block_specializations.values():
            _ops(block, counts)
        functions[name] = {"inputs": [_feature(f) for f in entry.input], "outputs": [_feature(f) for f in entry.output],
                           "states": [_feature(f) for f in entry.state], "ops": dict(sorted(counts.items()))}
    files = [p for p in package.rglob("*") if p.is_file()]
    weight_bytes = sum(p.stat().st_size for p in weights_dir(package).rglob("*") if p.is_file())
    model_file = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    return {"functions": functions, "default_function": description.defaultFunctionName or names[0],
            "specification_version": spec.specificationVersion,
            "size_bytes": sum(p.stat().st_size for p in files), "weight_bytes": weight_bytes,
            "model_spec_bytes": model_file.stat().st_size if model_file.is_file() else None}


def load_program(source: Any) -> Any:
    """The pymil Program of an MLModel or a package path (all functions, weights loaded)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    if isinstance(source, (str, Path)):
        spec, weights = ct.utils.load_spec(str(source)), str(weights_dir(Path(source)))
    else:
        spec, weights = source.get_spec(), source.weights_dir
    return load(spec, spec.specificationVersion, weights)


def program_consts(source: Any, function: str | None = None) -> dict[str, dict[str, Any]]:
    """Plain consts that live in the weight file: name -> shape, elements, consumer op types."""
    import numpy as np

    program = load_program(source)
    out: dict[str, dict[str, Any]] = {}
    for name, fn in program.functions.items():
        if function is not None and name != function:
            continue
        for op in fn.operations:
            value = op.outputs[0].val if op.op_type == "const" else None
            if not isinstance(value, np.ndarray) or value.size < 16 or value.dtype.kind != "f":
                continue
            consumers = {child.op_type for child in op.outputs[0].child_ops}
            entry = out.setdefault(op.name, {"shape": tuple(value.shape), "elements": int(value.size),
                                             "consumers": set()})
            entry["consumers"] |= consumers
    return out


def weights(source: Any, function: str | None = None, decompress: bool = True) -> dict[str, Any]:
    """const name -> float16 array, compressed weights decompressed (coremltools' WeightDecompressor)."""
    import numpy as np

    program = load_program(source)
    if decompress:
        from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

        WeightDecompressor(op_selector=lambda op: True).apply(program)
    out: dict[str, Any] = {}
    for name, fn in program.functions.items():
        if function is not None and name != function:
            continue
        for op in fn.operations:
            if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray) and op.outputs[0].val.dtype.kind == "f":
                out.setdefault(op.name, op.outputs[0].val)
    return out


def compressed_ops(source: Any) -> Counter:
    """constexpr op types per package (all functions): what compression left in the graph."""
    counts: Counter = Counter()
    for fn in load_program(source).functions.values():
        for op in fn.operations:
            if op.op_type.startswith("constexpr_"):
                counts[op.op_type] += 1
    return counts


def parameter_names(const_names: Any, hf_names: Any) -> dict[str, str]:
    """const op name -> HF parameter, by coremltools' naming: the torch attribute path with dots as
    underscores, under the traced wrapper's `decoder_` prefix, with a `_to_fp16` suffix (and, once
    compressed and decompressed, `_palettized` / `_quantized`)."""
    import re

    by_flat = {name.replace(".", "_"): name for name in hf_names}
    out = {}
    for const in const_names:
        flat = re.sub(r"(_to_fp16|_palettized|_quantized)+$", "", const).removeprefix("decoder_").removeprefix("encoder_")
        if flat in by_flat:
            out[const] = by_flat[flat]
    return out
