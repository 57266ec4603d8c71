"""Refuse an uploaded SavedModel whose graphs use ops outside an allow-list, before any op runs.

The task builder loads a developer's SavedModel and runs it (model check, TFLite
conversion, initial weights). TensorFlow ops can read and write files (``ReadFile``,
``WriteFile``, ``MatchingFiles``, file datasets and readers, lookup-table file
initializers, ``SaveV2``), reach ``gs://`` through TensorFlow's file systems, call back
into Python (``PyFunc``, ``EagerPyFunc``), print to files (``PrintV2``), talk to other
processes (``Send``/``Recv``, collectives, data service) and much more. An uploaded model
is hostile, so this module walks every node of the SavedModel -- the meta graphs'
top-level nodes and every function of the function library, including functions only
reachable through ``func`` attributes (``If``, ``While``, ``PartitionedCall`` ...) -- and
refuses any op that is not on :data:`ALLOWED_OPS`.

Why an allow-list and not a deny-list: TensorFlow registers about 1,400 ops and adds
more every release (and custom op libraries add their own); a deny-list silently lets
through the next file-reading op. The allow-list is what ordinary Keras / TFF training
models use -- the example models' ops plus the usual layers (dense, convolution,
pooling, normalization, dropout, embeddings, recurrent layers through ``While`` and
``TensorList``), activations, losses, and the math, array and control-flow ops they lower
to -- all pure computations on tensors and variables. A model that needs more gets an
error naming the op and the function it is in; the operator can extend the list.

Checkpoint ops (``SaveV2``, ``RestoreV2``, ``MergeV2Checkpoints``, ``ShardedFilename``)
are in every SavedModel: TensorFlow writes a ``_traced_save`` and a ``_traced_restore``
function that the meta graph's ``saver_def`` names (TF 1 style loaders run them; the
TF 2 loader restores variables itself). They are allowed only in functions reachable
from the ``saver_def`` nodes and from nothing else, so a model cannot call ``SaveV2``
from its predict or loss function.

Pure over the protobuf (no TensorFlow import): :func:`check_saved_model_file` parses
``saved_model.pb`` with the protobuf definitions TensorFlow ships.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fedcompute.errors import ArtifactBuildError

# Checkpoint ops: only inside the functions the SavedModel's saver_def names (see above).
SAVER_ONLY_OPS = frozenset({"SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename"})

# PrintV2 (tf.print) is allowed when it prints to the process's own streams, not to a file.
PRINT_OPS = frozenset({"PrintV2"})
PRINT_STREAMS = frozenset({"stderr", "stdout", "log(info)", "log(warning)", "log(error)"})

_CONTROL_FLOW = """
    NoOp Identity IdentityN StopGradient PreventGradient Const Placeholder PlaceholderWithDefault
    PartitionedCall StatefulPartitionedCall If StatelessIf While StatelessWhile Case StatelessCase
    Switch Merge Enter Exit NextIteration LoopCond ControlTrigger Assert CheckNumerics CheckNumericsV2
    EnsureShape OptionalNone OptionalFromValue OptionalGetValue OptionalHasValue
"""
_VARIABLES = """
    VarHandleOp ReadVariableOp AssignVariableOp AssignAddVariableOp AssignSubVariableOp
    VarIsInitializedOp DestroyResourceOp DisableCopyOnRead ResourceGather ResourceGatherNd
    ResourceScatterAdd ResourceScatterSub ResourceScatterMul ResourceScatterDiv ResourceScatterMin
    ResourceScatterMax ResourceScatterUpdate ResourceScatterNdAdd ResourceScatterNdSub
    ResourceScatterNdUpdate ResourceStridedSliceAssign VariableShape
    ResourceApplyGradientDescent ResourceApplyAdam ResourceApplyMomentum ResourceApplyKerasMomentum
    ResourceApplyAdagrad ResourceApplyAdagradV2 ResourceApplyRMSProp ResourceApplyAdadelta
    ResourceSparseApplyAdagrad ResourceSparseApplyAdagradV2 ResourceSparseApplyMomentum
    ResourceSparseApplyKerasMomentum ResourceSparseApplyRMSProp
"""
_MATH = """
    Abs Acos Acosh Add AddN AddV2 All Any ApproximateEqual ArgMax ArgMin Asin Asinh Atan Atan2 Atanh
    BatchMatMul BatchMatMulV2 BatchMatMulV3 Betainc BiasAdd BiasAddGrad BiasAddV1 Bincount Bucketize
    Cast Ceil ClipByValue Complex ComplexAbs Conj Cos Cosh Cross Cumprod Cumsum Digamma Div DivNoNan
    Einsum Equal Erf Erfc Erfinv Exp Expm1 Floor FloorDiv FloorMod Greater GreaterEqual Igamma Igammac
    Imag InvGrad Inv IsFinite IsInf IsNan LeftShift Less LessEqual Lgamma Log Log1p LogicalAnd
    LogicalNot LogicalOr MatMul Max Maximum Mean Min Minimum Mod Mul MulNoNan Ndtri Neg NextAfter
    NotEqual Polygamma Pow Prod RandomGammaGrad Real RealDiv Reciprocal ReciprocalGrad Relu Relu6
    RightShift Rint Round Rsqrt RsqrtGrad Select SelectV2 Sigmoid SigmoidGrad Sign Sin Sinh Softplus
    SoftplusGrad Softsign SoftsignGrad Sqrt SqrtGrad Square SquaredDifference Sub Sum Tan Tanh
    TanhGrad TruncateDiv TruncateMod Xdivy Xlog1py Xlogy Zeta BitwiseAnd BitwiseOr BitwiseXor Invert
    PopulationCount SegmentSum SegmentMean SegmentMax SegmentMin SegmentProd UnsortedSegmentSum
    UnsortedSegmentMax UnsortedSegmentMin UnsortedSegmentProd SparseSegmentSum SparseSegmentMean
    SparseSegmentSqrtN SparseSegmentSumGrad SparseSegmentMeanGrad SparseSegmentSqrtNGrad
    MatrixBandPart MatrixDiag MatrixDiagV2 MatrixDiagV3 MatrixDiagPart MatrixDiagPartV2
    MatrixDiagPartV3 MatrixSetDiag MatrixSetDiagV2 MatrixSetDiagV3 MatrixInverse MatrixDeterminant
    Cholesky Qr Svd SelfAdjointEigV2 MatrixTriangularSolve MatrixSolve LogMatrixDeterminant
    EuclideanNorm L2Loss HistogramFixedWidth
"""
_ARRAY = """
    BroadcastArgs BroadcastGradientArgs BroadcastTo Concat ConcatOffset ConcatV2 DeepCopy Diag
    DiagPart Empty ExpandDims Fill Gather GatherNd GatherV2 Identity InvertPermutation LinSpace
    ListDiff MirrorPad MirrorPadGrad OneHot OnesLike Pack Pad PadV2 Range Rank Reshape ResizeBilinear
    ResizeBilinearGrad ResizeNearestNeighbor ResizeNearestNeighborGrad Reverse ReverseSequence
    ReverseV2 Roll ScatterNd ScatterNdNonAliasingAdd Shape ShapeN Size Slice Snapshot SpaceToBatchND
    BatchToSpaceND SpaceToDepth DepthToSpace Split SplitV Squeeze StridedSlice StridedSliceGrad
    TensorScatterAdd TensorScatterMax TensorScatterMin TensorScatterSub TensorScatterUpdate Tile
    TileGrad TopKV2 Transpose Unique UniqueV2 UniqueWithCounts Unpack UnravelIndex Where ZerosLike
    Bitcast LowerBound UpperBound DynamicPartition DynamicStitch
    ParallelDynamicStitch ExtractImagePatches
"""
_NN = """
    AvgPool AvgPool3D AvgPool3DGrad AvgPoolGrad Conv2D Conv2DBackpropFilter Conv2DBackpropInput
    Conv3D Conv3DBackpropFilterV2 Conv3DBackpropInputV2 DepthwiseConv2dNative
    DepthwiseConv2dNativeBackpropFilter DepthwiseConv2dNativeBackpropInput Dilation2D Elu EluGrad
    FusedBatchNorm FusedBatchNormGrad FusedBatchNormGradV2 FusedBatchNormGradV3 FusedBatchNormV2
    FusedBatchNormV3 InTopKV2 LeakyRelu LeakyReluGrad LogSoftmax LRN LRNGrad MaxPool MaxPool3D
    MaxPool3DGrad MaxPoolGrad MaxPoolGradGrad MaxPoolGradGradV2 MaxPoolGradV2 MaxPoolV2
    MaxPoolWithArgmax MaxPoolGradWithArgmax Relu6Grad ReluGrad Selu SeluGrad Softmax
    SoftmaxCrossEntropyWithLogits SparseSoftmaxCrossEntropyWithLogits Conv2DBackpropFilterV2
    Conv2DBackpropInputV2 Conv
"""
_RANDOM = """
    RandomUniform RandomUniformInt RandomStandardNormal TruncatedNormal RandomShuffle RandomGamma
    RandomPoisson RandomPoissonV2 Multinomial StatelessRandomUniform StatelessRandomUniformInt
    StatelessRandomUniformFullInt StatelessRandomNormal StatelessTruncatedNormal
    StatelessMultinomial StatelessRandomUniformV2 StatelessRandomUniformIntV2
    StatelessRandomUniformFullIntV2 StatelessRandomNormalV2 StatelessTruncatedNormalV2
    StatelessRandomGetKeyCounter StatelessRandomGetKeyCounterAlg StatelessRandomGetAlg
    StatelessRandomBinomial StatelessRandomGammaV2 StatelessRandomGammaV3 StatelessRandomPoisson
    StatelessShuffle RngReadAndSkip RngSkip StatefulUniform StatefulUniformInt
    StatefulUniformFullInt StatefulStandardNormalV2 StatefulTruncatedNormal
"""
_TENSOR_LISTS = """
    TensorListReserve TensorListFromTensor TensorListStack TensorListGetItem TensorListSetItem
    TensorListPushBack TensorListPopBack TensorListLength TensorListElementShape TensorListGather
    TensorListScatter TensorListScatterV2 TensorListScatterIntoExistingList TensorListConcatV2
    TensorListSplit TensorListResize EmptyTensorList TensorListConcatLists TensorListPushBackBatch
    TensorArrayV3 TensorArrayReadV3 TensorArrayWriteV3 TensorArrayGatherV3 TensorArrayScatterV3
    TensorArraySizeV3 TensorArrayConcatV3 TensorArraySplitV3 TensorArrayCloseV3 TensorArrayGradV3
"""
# In-memory string ops: the checkpoint functions build shard names with them, and tf.print
# formats with them. None of them touches a file.
_STRINGS = """
    StringJoin StaticRegexFullMatch StaticRegexReplace RegexFullMatch AsString StringFormat
    StringLength StringToNumber StringSplitV2 Substr StringStrip StringLower StringUpper
    StringToHashBucketFast ReduceJoin
"""
# Parsing serialized tf.train.Example protos (the device's input pipeline, in memory).
_EXAMPLES = "ParseExample ParseExampleV2 ParseSingleExample DecodeRaw"
# Ragged / sparse helpers Keras emits for ordinary dense models (all in memory).
_COMPOSITES = """
    RaggedTensorToTensor RaggedTensorFromVariant RaggedTensorToVariant RaggedRange RaggedGather
    SparseTensorDenseMatMul SparseToDense SparseReshape SparseFillEmptyRows SparseReorder
"""

ALLOWED_OPS: frozenset[str] = frozenset(
    " ".join((_CONTROL_FLOW, _VARIABLES, _MATH, _ARRAY, _NN, _RANDOM, _TENSOR_LISTS, _STRINGS, _EXAMPLES,
              _COMPOSITES)).split()
) | PRINT_OPS
"""Ops an uploaded model may use anywhere (plus :data:`SAVER_ONLY_OPS` in its saver)."""

MAX_SAVED_MODEL_PROTO_BYTES = 512 * 1024 * 1024
MAX_REFUSED_LISTED = 10

FIX_HINT = ("build the model from standard TensorFlow / Keras layers and losses, without file, "
             "network, Python (tf.py_function / tf.numpy_function) or I/O ops; if the op is a "
             "pure tensor computation, ask the server operator to add it to the task builder's "
             "op allow-list (fedcompute/taskbuilder/op_allowlist.py)")


@dataclass(frozen=True)
class RefusedOp:
    """One use of an op that is not allowed: the op type, the node and where it is."""

    op: str
    node: str
    function: str  # library function name, or "" for the meta graph's top-level graph
    reason: str = "not on the allow-list"

    def describe(self) -> str:
        where = f"function {self.function!r}" if self.function else "the top-level graph"
        return f"op {self.op} (node {self.node!r} in {where}): {self.reason}"


class DisallowedOpError(ArtifactBuildError):
    """The uploaded model uses ops the task builder refuses to run."""

    refused: tuple[RefusedOp, ...] = ()

    @classmethod
    def for_refused(cls, refused: Iterable[RefusedOp]) -> DisallowedOpError:
        found = tuple(refused)
        listed = "; ".join(r.describe() for r in found[:MAX_REFUSED_LISTED])
        more = len(found) - MAX_REFUSED_LISTED
        if more > 0:
            listed += f"; and {more} more"
        ops = ", ".join(sorted({r.op for r in found}))
        error = cls(f"the saved model uses ops the task builder does not run ({ops}): {listed}", hint=FIX_HINT)
        error.refused = found
        return error


# --------------------------------------------------------------------------- the walk


def _function_refs(node: Any, library_names: frozenset[str]) -> Iterator[str]:
    """Library functions a node calls: as its op, or through ``func`` / ``list(func)`` attrs."""
    if node.op in library_names:
        yield node.op
    for value in node.attr.values():
        if value.HasField("func") and value.func.name:
            yield value.func.name
        if value.HasField("list"):
            for func in value.list.func:
                if func.name:
                    yield func.name


def _reachable(roots: Iterable[str], calls: Mapping[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack.extend(calls.get(name, ()))
    return seen


def _tensor_node(tensor_name: str) -> str:
    """``"StatefulPartitionedCall:0"`` / ``"^name"`` -> the node name."""
    return tensor_name.lstrip("^").split(":", 1)[0]


def _check_node(node: Any, function: str, saver_allowed: bool, allowed: frozenset[str],
                library_names: frozenset[str]) -> RefusedOp | None:
    op = node.op
    if op in library_names:
        return None  # a call of a library function: the function itself is walked
    if op in SAVER_ONLY_OPS:
        if saver_allowed:
            return None
        return RefusedOp(op, node.name, function, "checkpoint ops are allowed only in the SavedModel's saver")
    if op in PRINT_OPS:
        stream = node.attr["output_stream"].s.decode("utf-8", "replace") if "output_stream" in node.attr else "stderr"
        if stream in PRINT_STREAMS:
            return None
        return RefusedOp(op, node.name, function, f"prints to {stream[:80]!r}, not to stderr/stdout/log")
    if op in allowed:
        return None
    return RefusedOp(op, node.name, function)


def refused_ops(saved_model: Any, allowed: frozenset[str] = ALLOWED_OPS) -> list[RefusedOp]:
    """Every node of every meta graph of ``saved_model`` (a ``SavedModel`` proto) whose op is refused.

    Pure over the protobuf message. An empty list means the model may be loaded.
    """
    found: list[RefusedOp] = []
    for meta_graph in saved_model.meta_graphs:
        graph = meta_graph.graph_def
        functions = {f.signature.name: f for f in graph.library.function}
        library_names = frozenset(functions)
        calls: dict[str, set[str]] = {
            name: {ref for node in f.node_def for ref in _function_refs(node, library_names)}
            for name, f in functions.items()
        }
        saver = meta_graph.saver_def
        saver_nodes = {_tensor_node(n) for n in (saver.save_tensor_name, saver.restore_op_name) if n}
        saver_roots: set[str] = set()
        other_roots: set[str] = set()
        for node in graph.node:
            (saver_roots if node.name in saver_nodes else other_roots).update(_function_refs(node, library_names))
        saver_reach = _reachable(saver_roots, calls)
        # Every function not reached from the saver is model code (the object graph and the
        # signatures call library functions by name), and so is whatever it calls.
        model_reach = _reachable(other_roots | (library_names - saver_reach), calls)
        saver_only = saver_reach - model_reach
        for node in graph.node:
            refused = _check_node(node, "", node.name in saver_nodes, allowed, library_names)
            if refused is not None:
                found.append(refused)
        for name in sorted(functions):
            for node in functions[name].node_def:
                refused = _check_node(node, name, name in saver_only, allowed, library_names)
                if refused is not None:
                    found.append(refused)
    return found


def check_saved_model_proto(saved_model: Any, allowed: frozenset[str] = ALLOWED_OPS) -> None:
    """Raise :class:`DisallowedOpError` naming every refused op (and its function)."""
    refused = refused_ops(saved_model, allowed)
    if refused:
        raise DisallowedOpError.for_refused(refused)


def check_saved_model_file(directory: str | os.PathLike[str], allowed: frozenset[str] = ALLOWED_OPS) -> None:
    """Parse ``directory/saved_model.pb`` and check it (before TensorFlow loads anything)."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2  # the proto classes only; no op runs

    path = os.path.join(os.fspath(directory), "saved_model.pb")
    size = os.path.getsize(path)
    if size > MAX_SAVED_MODEL_PROTO_BYTES:
        raise ArtifactBuildError(f"saved_model.pb is {size} bytes, over {MAX_SAVED_MODEL_PROTO_BYTES}",
                                 hint="keep the weights in variables/, not in graph constants")
    saved_model = saved_model_pb2.SavedModel()
    try:
        with open(path, "rb") as handle:
            saved_model.ParseFromString(handle.read())
    except DecodeError as error:
        raise ArtifactBuildError("saved_model.pb is not a SavedModel protocol buffer",
                                 hint="save the model with tff.learning.models.save_functional_model") from error
    check_saved_model_proto(saved_model, allowed)
