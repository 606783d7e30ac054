"""LAMB exactly as ALBERT wrote it, with exact per-parameter trust ratios under DeepSpeed ZeRO.

ALBERT's LAMB (google-research/ALBERT ``lamb_optimizer.py``), per parameter w with gradient g:

    m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2          (no bias correction)
    u = m / (sqrt(v) + eps) + wd w
    r = ||w|| / ||u|| if both norms are > 0, else 1                 (no clamp)
    w = w - lr r u

Parameters whose names contain ``LayerNorm``, ``layer_norm`` or ``bias`` get neither weight decay nor the
trust ratio (r = 1); :func:`param_groups` builds the two groups.

The trust ratio is a property of a whole model parameter. Under DeepSpeed ZeRO the optimizer never sees
the parameters: DeepSpeed hands it one flat fp32 tensor per param group and rank (ZeRO-1/2, its BF16
optimizer) or per sub-group and rank (ZeRO-3), each a concatenation of pieces of many parameters. A
per-tensor trust ratio computed on those is silently wrong (DeepSpeed issues 88, 490, 1217, 1285).
:class:`Lamb` therefore keeps a layout: for each tensor it updates, the fragments (start, numel, parameter
index) of model parameters it holds. Each step it sums the squared norms of w and u per parameter over
this rank's fragments, all-reduces them over the partition group as one flat [2, parameters] tensor, and
scales every fragment by its parameter's exact ratio. That is one all-reduce per optimizer call that holds
trust-ratio parameters: once per training step at ZeRO-1/2 and with the BF16 optimizer (DeepSpeed calls
``step()`` once per param group, and the excluded group needs no norms), once per trust-ratio sub-group at
ZeRO-3 (one with the default ``sub_group_size``), none without ZeRO.

Use with DeepSpeed::

    lamb = Lamb(param_groups(model, weight_decay), lr=lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=lamb, config={
        ..., "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False})
    lamb.attach_zero_partitions(engine.optimizer)

Without ZeRO (a plain or DDP model) every tensor is a whole parameter and no call is needed. This module
does not import DeepSpeed; :func:`zero_partition_layout` reads DeepSpeed's internals duck-typed (the list
is in its docstring) and the multi-process tests pin them for the installed version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)

NO_DECAY_PATTERNS = ("LayerNorm", "layer_norm", "bias")
"""Substrings of parameter names that get neither weight decay nor the trust ratio (ALBERT's exclusions;
``layer_norm`` catches Hugging Face's ``full_layer_layer_norm``)."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """ALBERT's two parameter groups for :class:`Lamb`, by parameter name.

    Names containing one of :data:`NO_DECAY_PATTERNS` get ``weight_decay`` 0 and ``trust_ratio`` False;
    all others get ``weight_decay`` and the trust ratio. Tied tensors appear once, under their first name
    (``model.named_parameters()``). Each group carries ``names``, aligned with ``params``. Empty groups are
    left out (DeepSpeed drops them anyway).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay}: must be >= 0")
    adapted: dict[str, Any] = {"params": [], "names": [], "weight_decay": weight_decay, "trust_ratio": True}
    excluded: dict[str, Any] = {"params": [], "names": [], "weight_decay": 0.0, "trust_ratio": False}
    for name, param in model.named_parameters():
        group = excluded if any(pattern in name for pattern in NO_DECAY_PATTERNS) else adapted
        group["params"].append(param)
        group["names"].append(name)
    return [group for group in (adapted, excluded) if group["params"]]


class Fragment(NamedTuple):
    """A contiguous piece of one model parameter inside a flat tensor the optimizer updates."""

    start: int
    """Offset of the piece in the flat tensor."""
    numel: int
    """Elements in the piece."""
    index: int
    """The parameter's position in the optimizer's parameter list (groups in order, then params)."""
    offset: int = 0
    """Offset of the piece in the flattened parameter."""


@dataclass
class PartitionLayout:
    """Where the optimizer's parameters live in the tensors DeepSpeed hands it, on this rank."""

    fragments: dict[Tensor, list[Fragment]]
    """Per flat tensor (keyed by identity), the parameter pieces it holds on this rank."""
    process_group: Any
    """The group the parameters are partitioned over (None = the default group)."""
    partitioned: bool
    """True when each rank holds only part of the parameters (ZeRO); then norms must be all-reduced."""


def zero_partition_layout(zero_optimizer: Any, params: Sequence[Tensor]) -> PartitionLayout:
    """The layout of ``params`` in the flat fp32 tensors of a DeepSpeed optimizer wrapper, on this rank.

    ``zero_optimizer`` is ``engine.optimizer`` after ``deepspeed.initialize``; ``params`` are the model
    parameters the wrapped optimizer was built with, in order. Reads these DeepSpeed 0.19 internals:

    - ZeRO-1/2 (``DeepSpeedZeroOptimizer``): ``single_partition_of_fp32_groups`` (flat fp32 partition per
      param group) and ``real_dp_process_group`` (partition group per param group); on each parameter
      ``_hp_mapping`` (None where it has no element on this rank) with ``param_group_index``,
      ``get_hp_fragment_address()`` -> ``.start``, ``.numel`` and ``lp_fragment_address.start`` (the
      offset inside the parameter), set by ``link_hp_params``.
    - BF16 optimizer (``BF16_Optimizer``): the same, with ``fp32_groups_flat_partition`` as the flat list.
    - ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): ``fp32_partitioned_groups_flat`` (flat fp32 tensor per
      sub-group) and ``fp16_groups`` (the parameters of each sub-group, in flat order); on each parameter
      ``ds_tensor.ds_numel`` (its padded partition size), ``ds_numel`` (its full size) and
      ``ds_process_group``. A flat sub-group is the concatenation of its parameters' partitions; rank k
      holds elements [k p, (k + 1) p) of each, the tail of the last rank being padding.

    DeepSpeed without ZeRO in bf16/fp16 wraps a custom optimizer in ``FP16_UnfusedOptimizer`` (fp32 copies
    in ``fp32_groups``), which calls ``step()`` on zero gradients while it is built; with ALBERT's LAMB that
    step would decay the weights, so that wrapper is refused (its start-up step raises in ``Lamb.step``).
    """
    position = {id(param): i for i, param in enumerate(params)}

    def index_of(param: Tensor) -> int:
        if id(param) not in position:
            raise RuntimeError(
                "DeepSpeed partitions a parameter the optimizer was not built with; build the optimizer from "
                "the same model that is passed to deepspeed.initialize"
            )
        return position[id(param)]

    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):
        return _stage3_layout(zero_optimizer, index_of)
    for attribute in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(zero_optimizer, attribute):
            return _linked_layout(zero_optimizer, getattr(zero_optimizer, attribute), params)
    if hasattr(zero_optimizer, "fp32_groups"):
        raise NotImplementedError(
            f"{type(zero_optimizer).__name__}: DeepSpeed without ZeRO in bf16/fp16 is not supported (it steps the "
            "optimizer on zero gradients at start-up, which decays the weights); use ZeRO stage 1 or more"
        )
    raise TypeError(
        f"{type(zero_optimizer).__name__}: not a DeepSpeed optimizer wrapper whose layout is known "
        "(ZeRO-1/2/3, BF16_Optimizer)"
    )


def _linked_layout(zero_optimizer: Any, flats: Sequence[Tensor], params: Sequence[Tensor]) -> PartitionLayout:
    """ZeRO-1/2 and the BF16 optimizer: each parameter points at its fragment via ``_hp_mapping``."""
    if not any(hasattr(param, "_hp_mapping") for param in params):
        raise RuntimeError(
            f"{type(zero_optimizer).__name__}: no parameter carries `_hp_mapping`; DeepSpeed's internals "
            "differ from the pinned version"
        )
    fragments: dict[Tensor, list[Fragment]] = {flat: [] for flat in flats}
    for i, param in enumerate(params):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue  # no element of this parameter on this rank (or not trained)
        address = mapping.get_hp_fragment_address()
        piece = Fragment(address.start, address.numel, i, mapping.lp_fragment_address.start)
        fragments[flats[mapping.param_group_index]].append(piece)
    for flat, pieces in fragments.items():
        if any(piece.start < 0 or piece.start + piece.numel > flat.numel() for piece in pieces):
            raise RuntimeError(f"{type(zero_optimizer).__name__}: a fragment lies outside its flat partition")
    group = _only_group(zero_optimizer.real_dp_process_group)
    return PartitionLayout(fragments, group, partitioned=True)


def _stage3_layout(zero_optimizer: Any, index_of: Callable[[Tensor], int]) -> PartitionLayout:
    """ZeRO-3: each flat sub-group concatenates its parameters' partitions (``ds_tensor``)."""
    fragments: dict[Tensor, list[Fragment]] = {}
    groups = []
    for flat, members in zip(
        zero_optimizer.fp32_partitioned_groups_flat, zero_optimizer.fp16_groups, strict=True
    ):
        offset, pieces = 0, []
        for param in members:
            size = param.ds_tensor.ds_numel  # the padded partition size, the same on every rank
            groups.append(param.ds_process_group)
            start = dist.get_rank(group=param.ds_process_group) * size
            real = min(size, max(0, param.ds_numel - start))  # the rest is padding (uninitialized)
            if real:
                pieces.append(Fragment(offset, real, index_of(param), start))
            offset += size
        _check_size(flat, offset, type(zero_optimizer).__name__)
        fragments[flat] = pieces
    return PartitionLayout(fragments, _only_group(groups), partitioned=True)


def _check_size(flat: Tensor, expected: int, owner: str) -> None:
    if flat.numel() != expected:
        raise RuntimeError(
            f"{owner}: a flat tensor holds {flat.numel()} elements, its parameters {expected}; DeepSpeed's "
            "layout differs from the pinned version"
        )


def _only_group(groups: Iterable[Any]) -> Any:
    distinct = {id(group): group for group in groups}
    if len(distinct) > 1:
        raise NotImplementedError(
            "parameters are partitioned over different process groups (MoE experts, MiCS, hpZ): "
            "exact LAMB trust ratios are implemented for one data-parallel group"
        )
    return next(iter(distinct.values()), None)


class Lamb(torch.optim.Optimizer):
    """ALBERT's LAMB (see the module docstring), with fp32 state.

    Param group keys: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``trust_ratio`` (False = r 1), and
    optionally ``names`` (aligned with ``params``, used in messages). Updates fp32 tensors only: under
    DeepSpeed these are its fp32 master weights, whatever the model's dtype.

    A step has two phases with the all-reduce of the norms between them, and two ways to do the arithmetic:

    - CPU tensors (contiguous, as parameters and DeepSpeed's flat partitions are): chunk by chunk. On CPU,
      ``torch._foreach_*`` ops are a loop of per-tensor kernels, so the multi-tensor form sweeps all
      parameters once per operation, each sweep larger than the cache: 27 fp32 transfers per element
      between memory and cache, and two full-size temporaries allocated every step. Instead each tensor is
      cut into chunks of :attr:`_chunk_numel` elements, and the whole chain of phase 1 runs on one chunk
      while it is in cache: the moments in place, u into a buffer, and the norms of w and u over every
      parameter fragment the chunk holds. Phase 2 reads u back and writes w, scaling each fragment's piece
      by its ratio in a chunk-sized scratch tensor. That is 10 transfers per element (w, g, m, v read; m,
      v, u written; u, w read; w written) and no allocation after the first step.
      A group of at least :attr:`_compile_min_numel` elements (``compile_cpu``, the default) runs each
      phase as compiled loops instead (``torch.compile`` of :func:`_direction_chunk` and
      :func:`_apply_piece`, once per process: a few seconds, cached on disk by Inductor), one call per
      fragment piece of up to :attr:`_compiled_chunk_numel` elements, phase 1 returning the piece's squared
      norms. On one core torch's eager element-wise kernels are bound by their arithmetic (about 1 ns per
      element for phase 1's chain, more than its memory traffic costs); the compiled loops run at memory
      speed (``bench/lamb.py``: ALBERT-base's step 30 -> 18 ms, 76% of memcpy bandwidth). This is also the
      path of ZeRO-Offload (``zero.offload_optimizer=cpu``), where a GPU run's step is taken on the host.
      Without a working compiler the eager chain runs, after a warning.
    - Other devices, and groups with a non-contiguous tensor: the multi-tensor form, which on CUDA is a
      fused kernel.

    The eager chunks and the multi-tensor form run the same element-wise operations in the same order, so
    the moments and u get the same bits, and so do the weights where no fragment spans chunks (every tensor
    of up to :attr:`_chunk_numel` elements). A fragment that spans chunks gets its squared norm summed over
    the norms of its pieces, which rounds differently: torch's fp32 norm on CPU accumulates with an error
    that grows with the length, and the pieces are shorter. On ALBERT-base's word embeddings (3.8M
    elements) one step's ratio is off from a float64 reference by 2e-4 on the multi-tensor path and 5e-5
    on the chunked one; the weights then differ between the paths by that difference times the step lr r
    |u|: under 1e-8 for ALBERT's steps of 3.5e-5, an ulp or two of a typical weight. The compiled loops do
    the same operations in the same order too, but round differently (contracted multiply-adds, another
    square-root kernel, the norms' summation order): their moments, u and weights agree with the eager
    paths to fp32 rounding, not to the bit (ALBERT-base after 5 steps: weights within 1.5e-8, 2 ulps at
    the median where they differ).

    The CPU path keeps one fp32 buffer the size of each tensor it updates, for u (4 bytes per element for
    the optimizer's life, where the multi-tensor form allocates 8 transiently at every step), and the eager
    chunks one scratch chunk. They hold nothing from one step to the next, so they are not optimizer state:
    they live outside ``self.state``, and neither :meth:`state_dict` nor the checkpoints see them.
    """

    _chunk_numel = 1 << 18
    """Elements per array in a chunk of the CPU path: 1 MiB of fp32 per array, so that the five arrays of a
    chunk (w, g, m, v, u) stay in the cache between operations, and few enough chunks that the dispatch cost
    of an operation (a few microseconds) is small against its arithmetic (on ALBERT-base, 2^17 to 2^20
    measured alike, 2^15 45% slower)."""

    _chunked_on_cpu = True
    """Use the chunked path for CPU tensors; False forces the multi-tensor path everywhere (comparisons)."""

    _compiled_chunk_numel = 1 << 20
    """Elements per call of the compiled loop: it keeps nothing in cache between operations, so chunks can be
    larger, and fewer calls cost less of the compiled function's per-call overhead (~0.1 ms)."""

    _compile_min_numel = 1 << 20
    """Groups of at least this many elements take the compiled loop on the CPU path (when ``compile_cpu``);
    smaller ones, where a step costs less than a millisecond, are not worth the compilation. Under ZeRO the
    count is of the rank's own partition, so the same model can take the compiled loop at one rank and the
    eager chunks at several (the two agree to fp32 rounding)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_ratio: bool = True,
        compile_cpu: bool = True,
    ):
        # Every parameter the optimizer was built with, in order; a parameter's position is its index in
        # the per-step norm buffer and in the layout's fragments.
        self._params: list[Tensor] = []
        self._names: list[str] = []
        self._layout = PartitionLayout({}, None, partitioned=False)
        # The CPU path's buffers for u, per tensor it updates, and its scratch chunk (see the docstring).
        self._update_buffers: dict[Tensor, Tensor] = {}
        self._scratch: Tensor | None = None
        self._compile_cpu = compile_cpu
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "trust_ratio": trust_ratio,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group)
        names = group.get("names")
        if names is not None and len(names) != len(group["params"]):
            raise ValueError(f"names: {len(names)} names for {len(group['params'])} params")
        for j, param in enumerate(group["params"]):
            self._layout.fragments[param] = [Fragment(0, param.numel(), len(self._params))]
            self._params.append(param)
            self._names.append(
                names[j] if names is not None else f"param_groups[{len(self.param_groups) - 1}][{j}]"
            )

    def attach_zero_partitions(self, zero_optimizer: Any) -> None:
        """Learn how DeepSpeed laid out the parameters; call once after ``deepspeed.initialize`` with
        ``engine.optimizer``. A no-op when DeepSpeed hands this optimizer the parameters themselves (no
        ZeRO, fp32). Collective: every rank must call it. Checks that the fragments of all ranks cover each
        parameter exactly once."""
        if zero_optimizer is self:
            return
        layout = zero_partition_layout(zero_optimizer, self._params)
        if layout.partitioned:
            _check_coverage(layout, self._params, self._names)
        self._layout = layout

    skip_update = False
    """While True, :meth:`step` changes nothing (the training loop sets it for a step whose loss is not
    finite; the same on every rank, so the collective is skipped everywhere)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_update:
            return loss

        work = []  # (group, tensors with a gradient, their fragments), all looked up before any update
        for group in self.param_groups:
            tensors = [p for p in group["params"] if p.grad is not None]
            if tensors:
                work.append((group, tensors, [self._fragments(p) for p in tensors]))
        # [2, P]: squared norms of w and u per parameter, first over this rank's fragments, then global.
        # Its existence depends only on the param groups, which are the same on every rank.
        trusted = [group for group in self.param_groups if group["params"] and group["trust_ratio"]]
        squares = (
            torch.zeros(2, len(self._params), device=trusted[0]["params"][0].device) if trusted else None
        )

        # Phase 1: moments, u and this rank's squared norms; each group leaves its phase 2 to call.
        pending: list[Callable[[Tensor | None], None]] = []
        for group, tensors, fragments in work:
            self._init_state(tensors)
            if self._chunked_on_cpu and all(_chunkable(p, self.state[p]) for p in tensors):
                pending.append(self._chunked_direction(group, tensors, fragments, squares))
            else:
                pending.append(self._foreach_direction(group, tensors, fragments, squares))

        ratios = None
        if squares is not None:
            if self._layout.partitioned:
                # The one collective of a step; every rank takes part, even one holding no fragment.
                dist.all_reduce(squares, group=self._layout.process_group)
            norms = squares.sqrt()
            ratios = torch.where((norms[0] > 0) & (norms[1] > 0), norms[0] / norms[1], 1.0)
        # Phase 2: w -= lr r u.
        for apply in pending:
            apply(ratios)
        return loss

    def _init_state(self, tensors: list[Tensor]) -> None:
        """Checks ``tensors`` and their gradients, and creates their moments at the first step."""
        for p in tensors:
            if p.dtype != torch.float32:
                raise TypeError(f"{self._describe(p)}: Lamb updates fp32 tensors, got {p.dtype}")
            if p.grad.is_sparse:
                raise TypeError(f"{self._describe(p)}: Lamb does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _foreach_direction(
        self,
        group: dict[str, Any],
        tensors: list[Tensor],
        fragments: list[list[Fragment]],
        squares: Tensor | None,
    ) -> Callable[[Tensor | None], None]:
        """Multi-tensor path, phase 1: updates the moments, computes u = m / (sqrt(v) + eps) + wd w for
        every tensor (new tensors) and adds the squared norms of w and u per fragment to ``squares``.
        Returns phase 2, which takes the trust ratios."""
        beta1, beta2 = group["betas"]
        grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in tensors]
        exp_avgs = [self.state[p]["exp_avg"] for p in tensors]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in tensors]

        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        updates = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(updates, group["eps"])
        updates = torch._foreach_div(exp_avgs, updates)
        if group["weight_decay"]:
            torch._foreach_add_(updates, tensors, alpha=group["weight_decay"])

        views: list[Tensor] = []  # the fragments of the updates, to be scaled by their trust ratio
        index = None
        if group["trust_ratio"]:
            views = [v for u, pieces in zip(updates, fragments, strict=True) for v in _views(u, pieces)]
            weights = [v for w, pieces in zip(tensors, fragments, strict=True) for v in _views(w, pieces)]
            index = torch.tensor([f.index for pieces in fragments for f in pieces], device=squares.device)
            if views:
                squares[0].index_add_(0, index, torch.stack(torch._foreach_norm(weights)).square())
                squares[1].index_add_(0, index, torch.stack(torch._foreach_norm(views)).square())

        def apply(ratios: Tensor | None) -> None:
            if views:
                torch._foreach_mul_(views, ratios[index].unbind(0))
            torch._foreach_add_(tensors, updates, alpha=-group["lr"])

        return apply

    def _chunked_direction(
        self,
        group: dict[str, Any],
        tensors: list[Tensor],
        fragments: list[list[Fragment]],
        squares: Tensor | None,
    ) -> Callable[[Tensor | None], None]:
        """CPU path, phase 1: per chunk, updates the moments, writes u = m / (sqrt(v) + eps) + wd w into
        the tensor's u buffer and takes the norms of w and u over the pieces of fragments in the chunk;
        their squares are added to ``squares`` per parameter. Returns phase 2, which takes the ratios."""
        beta1, beta2 = group["betas"]
        eps, weight_decay, trust = group["eps"], group["weight_decay"], group["trust_ratio"]
        updates: list[Tensor] = []
        plans: list[list[tuple[int, int, int]]] = []  # per tensor, its (start, stop, parameter index) pieces
        w_squares: list[Tensor] = []  # ||w||^2 of each piece
        u_squares: list[Tensor] = []  # ||u||^2 of each piece
        compiled = (
            self._compile_cpu
            and sum(p.numel() for p in tensors) >= self._compile_min_numel
            and cpu_step_compiles()
        )
        chunk_numel = self._compiled_chunk_numel if compiled else self._chunk_numel
        hyper = (beta1, beta2, eps, weight_decay)
        for p, pieces in zip(tensors, fragments, strict=True):
            state = self.state[p]
            u = self._update_buffer(p)
            updates.append(u)
            arrays = (p, p.grad, state["exp_avg"], state["exp_avg_sq"], u)
            # Detached views: the same memory, and one requires_grad for the compiled function's guards.
            w, g, m, v, u = (t.detach().view(-1) for t in arrays)
            plan: list[tuple[int, int, int]] = []
            for start, stop, inside in _chunk_plan(w.numel(), pieces if trust else [], chunk_numel):
                plan += inside
                if compiled:
                    # One call per piece, and per stretch outside every piece (ZeRO padding), each
                    # returning the squared norms of its w and u.
                    for a, b, index in _segments(start, stop, inside):
                        found = _COMPILED_DIRECTION.kernel(w[a:b], g[a:b], m[a:b], v[a:b], u[a:b], *hyper)
                        if index is not None:
                            w_squares.append(found[0])
                            u_squares.append(found[1])
                    continue
                wc, mc, vc, uc = w[start:stop], m[start:stop], v[start:stop], u[start:stop]
                gc = g[start:stop] if g.dtype == torch.float32 else g[start:stop].float()
                mc.mul_(beta1).add_(gc, alpha=1.0 - beta1)
                vc.mul_(beta2).addcmul_(gc, gc, value=1.0 - beta2)
                torch.sqrt(vc, out=uc)
                uc.add_(eps)
                torch.div(mc, uc, out=uc)
                if weight_decay:
                    uc.add_(wc, alpha=weight_decay)
                if inside:
                    pieces_w = [w[a:b] for a, b, _ in inside]
                    pieces_u = [u[a:b] for a, b, _ in inside]
                    found = torch._foreach_norm(pieces_w + pieces_u)
                    w_squares += (n.square() for n in found[: len(inside)])
                    u_squares += (n.square() for n in found[len(inside) :])
            plans.append(plan)
        if w_squares:
            index = torch.tensor([i for plan in plans for _, _, i in plan], device=squares.device)
            squares[0].index_add_(0, index, torch.stack(w_squares))
            squares[1].index_add_(0, index, torch.stack(u_squares))

        def apply(ratios: Tensor | None) -> None:
            lr = group["lr"]
            if not trust:
                for p, u in zip(tensors, updates, strict=True):
                    p.add_(u, alpha=-lr)
                return
            ratio = ratios.unbind(0)
            scratch = None if compiled else self._scratch_chunk()
            step = torch.tensor(-lr) if compiled else None
            for p, u, plan in zip(tensors, updates, plans, strict=True):
                w, u = p.detach().view(-1), u.view(-1)
                done = 0
                for start, stop, i in plan:
                    if done < start:  # elements outside every fragment (ZeRO padding): r = 1
                        w[done:start].add_(u[done:start], alpha=-lr)
                    if compiled:
                        _COMPILED_APPLY.kernel(w[start:stop], u[start:stop], ratio[i], step)
                    else:
                        scaled = torch.mul(u[start:stop], ratio[i], out=scratch[: stop - start])
                        w[start:stop].add_(scaled, alpha=-lr)
                    done = stop
                if done < w.numel():
                    w[done:].add_(u[done:], alpha=-lr)

        return apply

    def _update_buffer(self, tensor: Tensor) -> Tensor:
        """The CPU path's buffer for u of ``tensor``, allocated once."""
        buffer = self._update_buffers.get(tensor)
        if buffer is None or buffer.shape != tensor.shape:
            buffer = torch.empty_like(tensor, memory_format=torch.contiguous_format)
            self._update_buffers[tensor] = buffer
        return buffer

    def _scratch_chunk(self) -> Tensor:
        """The CPU path's scratch for one chunk of r u, allocated once."""
        if self._scratch is None or self._scratch.numel() < self._chunk_numel:
            self._scratch = torch.empty(self._chunk_numel)
        return self._scratch

    def _fragments(self, tensor: Tensor) -> list[Fragment]:
        fragments = self._layout.fragments.get(tensor)
        if fragments is None:
            raise RuntimeError(
                f"Lamb was handed a tensor of {tensor.numel()} elements that is not one of its parameters. "
                "Under DeepSpeed, call lamb.attach_zero_partitions(engine.optimizer) after "
                "deepspeed.initialize. DeepSpeed without ZeRO in bf16/fp16 (its FP16_UnfusedOptimizer, which "
                "also takes a step at start-up) is not supported: use ZeRO stage 1 or more, or fp32."
            )
        return fragments

    def _describe(self, tensor: Tensor) -> str:
        for i, param in enumerate(self._params):
            if param is tensor:
                return self._names[i]
        return f"flat tensor of {tensor.numel()} elements"


class AdamW(torch.optim.AdamW):
    """torch's AdamW with :attr:`Lamb.skip_update`: a step that can be skipped without touching the state."""

    skip_update = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.skip_update:
            return None
        return super().step(closure)


def _direction_chunk(
    w: Tensor, g: Tensor, m: Tensor, v: Tensor, u: Tensor, beta1: float, beta2: float, eps: float, wd: float
) -> tuple[Tensor, Tensor]:
    """Phase 1 of the CPU path on one piece, written for ``torch.compile`` to make one loop of: the moments
    in place, u = m / (sqrt(v) + eps) + wd w into ``u`` (the eager chain's operations in its order), and
    the squared norms of w and u."""
    g = g.float()
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    direction = m / (v.sqrt() + eps)
    if wd:
        direction = direction + wd * w
    u.copy_(direction)
    return (w * w).sum(), (direction * direction).sum()


def _apply_piece(w: Tensor, u: Tensor, ratio: Tensor, step: Tensor) -> None:
    """Phase 2 of the CPU path on one piece, for ``torch.compile``: w += step (r u), step being -lr, as the
    eager path's w.add_(r u, alpha=-lr). The scalars are 0-d tensors, so that a new lr compiles nothing."""
    w.add_(step * (u * ratio))


def _segments(
    start: int, stop: int, inside: list[tuple[int, int, int]]
) -> Iterator[tuple[int, int, int | None]]:
    """Cuts [start, stop) at the pieces ``inside`` it (from :func:`_chunk_plan`): yields (a, b, parameter
    index) for each piece and (a, b, None) for each stretch between them."""
    at = start
    for a, b, index in inside:
        if at < a:
            yield at, a, None
        yield a, b, index
        at = b
    if at < stop:
        yield at, stop, None


class _CompiledKernel:
    """A function compiled by ``torch.compile`` once per process, on first use. :meth:`available` compiles
    it on a small probe and says whether that worked; where it does not (no C++ compiler, for one) it warns
    once and the caller does the work eagerly."""

    def __init__(self, fn: Callable[..., Any], probe: Callable[[], tuple[Any, ...]]):
        self._fn = fn
        self._probe = probe
        self._usable: bool | None = None  # None: not tried yet
        self.kernel: Callable[..., Any] = fn

    def available(self) -> bool:
        if self._usable is None:
            kernel = torch.compile(self._fn, dynamic=True, fullgraph=True)
            try:
                kernel(*self._probe())
            except Exception as error:  # whatever stops the compiler: run eagerly
                first_line = (str(error).strip().splitlines() or [""])[0][:200]
                log.warning(
                    "LAMB: torch.compile of the CPU step does not work here (%s: %s); using torch's eager "
                    "kernels, which give the same result more slowly",
                    type(error).__name__,
                    first_line,
                )
                self._usable = False
            else:
                self.kernel = kernel
                self._usable = True
        return self._usable


_PROBE_NUMEL = 1 << 13
"""Elements of the probes that compile the kernels: above the sizes for which Inductor makes a separate
small-size variant, so that the probe compiles the variant the chunks use."""


def _direction_probe() -> tuple[Any, ...]:
    w, g, m, v, u = (torch.full((_PROBE_NUMEL,), 0.5) for _ in range(5))
    return w, g, m, v, u, 0.9, 0.999, 1e-6, 0.01


def _apply_probe() -> tuple[Any, ...]:
    return (
        torch.full((_PROBE_NUMEL,), 0.5),
        torch.full((_PROBE_NUMEL,), 0.5),
        torch.tensor(0.5),
        torch.tensor(-0.1),
    )


_COMPILED_DIRECTION = _CompiledKernel(_direction_chunk, _direction_probe)
_COMPILED_APPLY = _CompiledKernel(_apply_piece, _apply_probe)


def cpu_step_compiles() -> bool:
    """Whether the CPU path's compiled loops work in this process; compiles them on the first call."""
    return _COMPILED_DIRECTION.available() and _COMPILED_APPLY.available()


def _views(tensor: Tensor, fragments: list[Fragment]) -> list[Tensor]:
    """The pieces of ``tensor`` named by ``fragments`` (the tensor itself when it is one whole parameter)."""
    if len(fragments) == 1 and fragments[0].start == 0 and fragments[0].numel == tensor.numel():
        return [tensor]
    flat = tensor.view(-1)
    return [flat.narrow(0, f.start, f.numel) for f in fragments]


def _chunkable(tensor: Tensor, state: dict[str, Tensor]) -> bool:
    """Whether the CPU path can update ``tensor``: it, its gradient and its moments are contiguous CPU
    tensors, so that one flat range is the same elements in each."""
    arrays = (tensor, tensor.grad, state["exp_avg"], state["exp_avg_sq"])
    return all(t.device.type == "cpu" and t.is_contiguous() for t in arrays)


def _chunk_plan(
    numel: int, fragments: Sequence[Fragment], size: int
) -> Iterator[tuple[int, int, list[tuple[int, int, int]]]]:
    """Cuts a flat tensor of ``numel`` elements into chunks of at most ``size``: yields each chunk's
    (start, stop, pieces), the pieces being where ``fragments`` overlap the chunk, as (start, stop,
    parameter index) in the flat tensor, in order."""
    ordered = sorted((f for f in fragments if f.numel > 0), key=lambda f: f.start)
    first = 0  # the first fragment that does not end before the current chunk
    for start in range(0, numel, size):
        stop = min(numel, start + size)
        while first < len(ordered) and ordered[first].start + ordered[first].numel <= start:
            first += 1
        pieces = []
        k = first
        while k < len(ordered) and ordered[k].start < stop:
            f = ordered[k]
            pieces.append((max(start, f.start), min(stop, f.start + f.numel), f.index))
            k += 1
        yield start, stop, pieces


def _check_hyperparameters(group: dict[str, Any]) -> None:
    beta1, beta2 = group["betas"]
    checks = (
        ("lr", group["lr"], group["lr"] >= 0, "must be >= 0"),
        ("betas", group["betas"], 0 <= beta1 < 1 and 0 <= beta2 < 1, "each must be in [0, 1)"),
        ("eps", group["eps"], group["eps"] > 0, "must be > 0"),
        ("weight_decay", group["weight_decay"], group["weight_decay"] >= 0, "must be >= 0"),
    )
    for key, value, ok, rule in checks:
        if not ok:
            raise ValueError(f"{key}={value}: {rule}")


def _check_coverage(layout: PartitionLayout, params: Sequence[Tensor], names: Sequence[str]) -> None:
    """All ranks' fragments must cover each trained parameter exactly once (a one-time collective)."""
    if not params:
        return
    covered = [0] * len(params)
    for pieces in layout.fragments.values():
        for piece in pieces:
            covered[piece.index] += piece.numel
    device = next((flat.device for flat in layout.fragments), params[0].device)
    counts = torch.tensor(covered, dtype=torch.long, device=device)
    dist.all_reduce(counts, group=layout.process_group)
    for i, count in enumerate(counts.tolist()):
        full = getattr(params[i], "ds_numel", None) or params[i].numel()
        if count not in (0, full):  # 0: a frozen parameter DeepSpeed does not optimize
            raise RuntimeError(
                f"{names[i]}: the ranks' fragments cover {count} of {full} elements; DeepSpeed's layout "
                "differs from the pinned version"
            )
