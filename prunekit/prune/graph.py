"""What is coupled to what: the channel dependency graph of a network, found by tracing it.

Removing output channel ``c`` of a conv/linear layer ("the producer") must also remove every
tensor slice that is indexed by that channel downstream: the producer's bias, a following
BatchNorm, a per-channel parameter it is multiplied with (SSD's L2Norm ``scale_weight``), and
the input channels of *every* consumer, wherever the tensor flows (conv4_3 feeds conv5_1 and two
detection-head convs). A flatten in front of a linear layer turns one channel into a block of
``h*w`` input features; a concat shifts a producer's channels by an offset; a residual add ties
two producers to one shared selection.

The graph is found with ``torch.fx`` on a meta-device copy of the network (for SSD detectors the
raw network :class:`prunekit.models.SSDRaw`), with shapes propagated by fx's ``ShapeProp``, so no
per-architecture tables are needed: any plain CNN of conv / BN / activation / pool / dropout /
linear / concat / add works. Anything the walker does not understand makes the producers whose
channels reach it *not prunable* (with the reason), never silently wrong.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

log = logging.getLogger(__name__)

PRODUCER_TYPES = (nn.Conv2d, nn.Linear)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
# Modules whose output channel c depends only on input channel c.
PASSTHROUGH_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Sigmoid,
    nn.Tanh,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.Upsample,
)
PASSTHROUGH_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.elu,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.dropout,
    F.dropout2d,
    # L2 normalisation over channels: a channel that is exactly zero does not change the norm.
    F.normalize,
}
PASSTHROUGH_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float"}
ELEMENTWISE = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul}
ELEMENTWISE_METHODS = {"add", "mul", "add_", "mul_", "sub", "div"}
HEAD_SUFFIXES = ("_mbox_loc", "_mbox_conf")
VIEW_METHODS = {"view", "reshape", "unsqueeze", "expand", "expand_as"}


@dataclass(frozen=True)
class Slot:
    """Where a producer's channels sit in some tensor dimension: channel c <-> indices
    ``offset + c*block .. offset + (c+1)*block - 1`` (block > 1 after a flatten)."""

    offset: int = 0
    block: int = 1

    def indices(self, channels: Iterable[int]) -> list[int]:
        return [self.offset + c * self.block + j for c in channels for j in range(self.block)]


@dataclass(frozen=True)
class Coupling:
    """One tensor slice that shrinks with a group.

    ``kind``: ``"out"`` (conv/linear weight dim 0 + bias), ``"in"`` (conv/linear weight dim 1),
    ``"norm"`` (BatchNorm weight/bias/running stats) or ``"param"`` (a free parameter, indexed
    along its only non-singleton dimension). ``target`` is a module path, or a parameter path for
    ``"param"``.
    """

    target: str
    kind: str
    slot: Slot = Slot()


@dataclass
class Group:
    """Producers that share one channel selection, and every slice that follows it."""

    name: str  # layer name of the first producer (paper name where the model has one)
    producers: list[str]  # module paths
    channels: int
    couplings: list[Coupling] = field(default_factory=list)
    prunable: bool = True
    reason: str = ""

    @property
    def consumers(self) -> list[Coupling]:
        return [c for c in self.couplings if c.kind == "in"]


@dataclass
class DependencyGraph:
    """Channel groups of a network, addressed by layer name.

    ``names`` maps layer name -> module path (paper names for prunekit models, module paths
    otherwise); ``groups`` lists groups in forward order.
    """

    names: dict[str, str]
    groups: list[Group]

    def __post_init__(self) -> None:
        self.paths = {p: n for n, p in self.names.items()}
        self._by_path = {p: g for g in self.groups for p in g.producers}

    def name_of(self, path: str) -> str:
        return self.paths.get(path, path)

    def path_of(self, name: str) -> str:
        if name in self.names:
            return self.names[name]
        if name in self.paths:
            return name
        raise ValueError(f"unknown layer {name!r}; known layers: {', '.join(list(self.names)[:8])}...")

    def group(self, name: str) -> Group:
        """The group whose producers include layer ``name``."""
        path = self.path_of(name)
        if path not in self._by_path:
            raise ValueError(f"layer {name!r} has no prunable output (not a conv/linear producer)")
        return self._by_path[path]

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def consumers(self, name: str) -> list[str]:
        """Layer names whose input channels shrink with layer ``name``'s filters."""
        return [self.name_of(c.target) for c in self.group(name).consumers]


def layer_names_of(model: nn.Module) -> dict[str, str]:
    """Paper names for prunekit models, module paths (conv/linear) for anything else."""
    if getattr(model, "prunekit_config", None) is not None:
        from prunekit.models import layer_names

        return layer_names(model)
    return {p: p for p, m in model.named_modules() if isinstance(m, PRODUCER_TYPES)}


def traced_network(model: nn.Module) -> nn.Module:
    """The module to trace: SSD detectors' raw network (no pre/post-processing), else the model."""
    cfg = getattr(model, "prunekit_config", None)
    if cfg is not None and cfg.is_detector:
        from prunekit.models import SSDRaw

        return SSDRaw(model)
    return model


def example_input(model: nn.Module) -> torch.Tensor:
    cfg = getattr(model, "prunekit_config", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} is not a prunekit model: pass example_input explicitly")
    return torch.zeros(1, 3, *cfg.input_size)


def build_dependency_graph(model: nn.Module, example: torch.Tensor | None = None) -> DependencyGraph:
    """Trace ``model`` and group every conv/linear output with the slices coupled to it.

    Head output convs of SSD and the network's final layer are found not prunable because their
    outputs reach reshapes / the network output. ``example`` (shape only; defaults to the
    prunekit config's input size) drives shape propagation on the meta device.
    """
    net = traced_network(model)
    example = example_input(model) if example is None else example
    meta = copy.deepcopy(net).to("meta").eval()
    try:
        gm = fx.symbolic_trace(meta)
    except Exception as e:  # noqa: BLE001 - fx raises many types for untraceable code
        raise ValueError(f"cannot trace {type(net).__name__} with torch.fx: {type(e).__name__}: {e}") from e
    ShapeProp(gm).propagate(torch.empty(example.shape, device="meta"))
    names = layer_names_of(model)
    return _Walker(gm, names).run()


class _Walker:
    """Propagates, per fx node, which producers' channels occupy its dim 1 (and where)."""

    def __init__(self, gm: fx.GraphModule, names: dict[str, str]):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.names = names
        self.paths = {p: n for n, p in names.items()}
        self.src: dict[fx.Node, list[tuple[str, Slot]]] = {}
        self.param_of: dict[fx.Node, str] = {}  # nodes that are (views of) a parameter
        self.couplings: dict[str, list[Coupling]] = {}
        self.channels: dict[str, int] = {}
        self.blocked: dict[str, str] = {}
        self.parent: dict[str, str] = {}  # union-find for residual ties
        self.parameters = {n for n, _ in gm.named_parameters()}

    # -- union-find -------------------------------------------------------------------------
    def find(self, p: str) -> str:
        while self.parent[p] != p:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        return p

    def tie(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    # -- helpers ----------------------------------------------------------------------------
    def block(self, sources: list[tuple[str, Slot]], reason: str) -> None:
        for p, _ in sources:
            self.blocked.setdefault(p, reason)

    def couple(self, sources: list[tuple[str, Slot]], target: str, kind: str) -> None:
        for p, slot in sources:
            self.couplings[p].append(Coupling(target, kind, slot))

    @staticmethod
    def shape(node: object) -> tuple[int, ...] | None:
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.src or a in self.param_of]

    def label(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.modules[node.target]).__name__} {node.target}"
        return f"{node.op} {getattr(node.target, '__name__', node.target)}"

    # -- walk -------------------------------------------------------------------------------
    def run(self) -> DependencyGraph:
        for node in self.gm.graph.nodes:
            self.visit(node)
        return self.finish()

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.src[node] = []
        elif node.op == "get_attr":
            self.param_of[node] = str(node.target)
        elif node.op == "output":
            for a in node.all_input_nodes:
                self.block(self.src.get(a, []), "reaches the network output")
        elif node.op == "call_module":
            self.visit_module(node, self.modules[node.target])
        else:
            self.visit_function(node)

    def visit_module(self, node: fx.Node, mod: nn.Module) -> None:
        x = node.args[0] if node.args else None
        sources = self.src.get(x, []) if isinstance(x, fx.Node) else []
        path = str(node.target)
        if isinstance(mod, PRODUCER_TYPES):
            if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                self.block(sources, f"feeds grouped conv {path}")
            else:
                self.couple(sources, path, "in")
            if path in self.couplings:  # a module called twice shares weights: not prunable
                self.blocked.setdefault(path, "module is called more than once")
                self.src[node] = [(path, Slot())]
                return
            self.couplings[path] = [Coupling(path, "out")]
            self.channels[path] = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
            self.parent[path] = path
            self.src[node] = [(path, Slot())]
        elif isinstance(mod, NORM_TYPES):
            self.couple(sources, path, "norm")
            self.src[node] = sources
        elif isinstance(mod, PASSTHROUGH_MODULES):
            self.src[node] = sources
        elif isinstance(mod, nn.Flatten):
            self.src[node] = self.flatten(node, x, mod.start_dim, mod.end_dim)
        else:
            self.unknown(node)

    def visit_function(self, node: fx.Node) -> None:
        target = node.target
        x = node.args[0] if node.args else None
        if self.shape(node) is None:
            # Non-tensor results (x.shape, sizes): they carry no channels.
            self.src[node] = []
            return
        if node.op == "call_method" and target in VIEW_METHODS and x in self.param_of:
            self.param_of[node] = self.param_of[x]
            return
        if (
            node.op == "call_function"
            and target in PASSTHROUGH_FUNCTIONS
            or (node.op == "call_method" and target in PASSTHROUGH_METHODS)
        ):
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 1)
            if target is F.normalize and dim not in (1, -3 if len(self.shape(x) or ()) == 4 else 1):
                self.unknown(node)
                return
            self.src[node] = self.src.get(x, [])
            return
        if (node.op == "call_function" and target is torch.flatten) or (
            node.op == "call_method" and target == "flatten"
        ):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self.src[node] = self.flatten(node, x, start, end)
            return
        if node.op == "call_method" and target in ("view", "reshape"):
            out = self.shape(node)
            if out is not None and len(out) == 2 and self.shape(x) is not None and len(self.shape(x)) >= 2:
                self.src[node] = self.flatten(node, x, 1, -1)
                return
        if (node.op == "call_function" and target in ELEMENTWISE) or (
            node.op == "call_method" and target in ELEMENTWISE_METHODS
        ):
            self.elementwise(node)
            return
        if node.op == "call_function" and target is torch.cat:
            self.concat(node)
            return
        self.unknown(node)

    def unknown(self, node: fx.Node) -> None:
        sources = [s for a in node.all_input_nodes for s in self.src.get(a, [])]
        self.block(sources, f"its channels reach {self.label(node)}, which prunekit cannot slice")
        self.src[node] = []

    def flatten(self, node: fx.Node, x: object, start: int, end: int) -> list[tuple[str, Slot]]:
        shape = self.shape(x)
        sources = self.src.get(x, []) if isinstance(x, fx.Node) else []
        if shape is None or not sources:
            return []
        nd = len(shape)
        start, end = start % nd, end % nd
        if start == 0 and shape[0] == 1 and end >= 1:
            start = 1  # batch of one flattened with it: channel layout is the same
        if start != 1 or end != nd - 1:
            self.block(sources, f"flattened over dims {start}..{end} at {self.label(node)}")
            return []
        spatial = 1
        for s in shape[2:]:
            spatial *= s
        return [(p, Slot(slot.offset * spatial, slot.block * spatial)) for p, slot in sources]

    def elementwise(self, node: fx.Node) -> None:
        args = [a for a in node.args if isinstance(a, fx.Node)]
        params = [a for a in args if a in self.param_of]
        tensors = [a for a in args if a in self.src]
        if len(tensors) == 1:
            sources = self.src[tensors[0]]
            shape = self.shape(tensors[0])
            for p in params:
                pshape = self.shape(p) or ()
                numel = 1
                for s in pshape:
                    numel *= s
                if numel == 1:
                    continue
                if self.param_of[p] not in self.parameters:
                    self.block(
                        sources, f"combined with buffer {self.param_of[p]}, which prunekit does not slice"
                    )
                    continue
                if shape is None or len(shape) < 2 or numel != shape[1]:
                    self.block(sources, f"multiplied by parameter {self.param_of[p]} of shape {pshape}")
                    continue
                self.couple(sources, self.param_of[p], "param")
            self.src[node] = sources
            return
        if len(tensors) == 2 and not params:
            a, b = (self.src[t] for t in tensors)
            if self.shape(tensors[0]) != self.shape(tensors[1]):
                self.block(a + b, f"broadcast at {self.label(node)}")
                self.src[node] = []
                return
            # Residual add: both operands' channels line up, so their producers share a selection.
            by_slot_a = {slot: p for p, slot in a}
            by_slot_b = {slot: p for p, slot in b}
            if set(by_slot_a) != set(by_slot_b):
                self.block(a + b, f"operands of {self.label(node)} carry different channel layouts")
                self.src[node] = []
                return
            for slot, p in by_slot_a.items():
                self.tie(p, by_slot_b[slot])
            self.src[node] = a + b
            return
        self.unknown(node)

    def concat(self, node: fx.Node) -> None:
        inputs = node.args[0] if node.args else node.kwargs.get("tensors", [])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        inputs = list(inputs)
        shapes = [self.shape(t) for t in inputs]
        all_sources = [s for t in inputs for s in self.src.get(t, [])]
        if any(s is None for s in shapes) or dim % len(shapes[0]) != 1:
            self.block(all_sources, f"concatenated along dim {dim} at {self.label(node)}")
            self.src[node] = []
            return
        out: list[tuple[str, Slot]] = []
        offset = 0
        for t, shape in zip(inputs, shapes):
            out += [(p, Slot(offset + slot.offset, slot.block)) for p, slot in self.src.get(t, [])]
            offset += shape[1]
        self.src[node] = out

    def finish(self) -> DependencyGraph:
        members: dict[str, list[str]] = {}
        for p in self.couplings:  # dict order = forward order
            members.setdefault(self.find(p), []).append(p)
        groups = []
        for ps in members.values():
            reasons = [f"{self.paths.get(p, p)}: {self.blocked[p]}" for p in ps if p in self.blocked]
            if any(self.paths.get(p, p).endswith(HEAD_SUFFIXES) for p in ps):
                reasons = ["detection-head output conv"]
            widths = {self.channels[p] for p in ps}
            if len(widths) != 1:
                reasons.append(f"tied producers have different widths {sorted(widths)}")
            couplings: list[Coupling] = []
            for p in ps:
                for c in self.couplings[p]:
                    if c not in couplings:
                        couplings.append(c)
            groups.append(
                Group(
                    name=self.paths.get(ps[0], ps[0]),
                    producers=ps,
                    channels=self.channels[ps[0]],
                    couplings=couplings,
                    prunable=not reasons,
                    reason="; ".join(reasons),
                )
            )
        return DependencyGraph(dict(self.names), groups)
