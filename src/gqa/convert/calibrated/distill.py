"""Local (per-layer) distillation: fit each reduced attention block to the original one, a layer at a time.

After grouping, alignment and merging, a layer's attention with fewer KV heads still differs from the
original. :func:`distill_local` fits the student's attention parameters (Q, K, V and O, or only K and V;
both keep the checkpoint's shapes) with Adam so that, on calibration text, the student's layer
reproduces the teacher's. No end-to-end training: each layer is a small least-squares-like problem.

What is matched, for layer i (h = residual stream entering the layer, a = attn_norm(h)):

* ``inputs="original"``: the student sees the teacher's own a_i and must reproduce the teacher's
  attention output attn_T(a_i) (the recipe measured in the issue that introduced this stage).
* ``inputs="converted"``: the student sees its own stream h'_i (the converted model run through the
  already-distilled layers 0..i-1) and must reproduce the teacher's *post-attention residual*:
  ``attn_S(a'_i) ~ h_i + attn_T(a_i) - h'_i``. Each layer thus also removes the drift accumulated by
  the layers before it.
* ``loss="block"`` matches the whole block's output (attention + MLP, the residual stream leaving the
  layer) instead of the post-attention residual; only attention parameters move, unless
  ``params="qkvo-mlp"``: then the layer's MLP moves too (the loss is ``"block"``), so the MLP can absorb
  what a reduced attention cannot. Shapes never change; an MLP the student shared with the teacher
  (``reduce_kv_heads(share_unchanged=True)``) is copied first, the teacher is never written.
* ``window=W`` > 1 fits W consecutive layers jointly (blockwise local distillation, as in Puzzle): the
  windows ``[0, W), [W, 2W), ...`` each move their layers' parameters together to match the teacher's
  residual stream leaving the window (the loss is ``"block"`` over the window), so a layer can leave an
  error that a later layer of its window repairs.

How tokens are weighted (``weighting``):

* ``"token"``: each token's squared error is divided by the squared norm of the teacher's
  residual stream at that token (the stream the student must reproduce), i.e. the mean per-token
  relative error. Every consumer of the residual stream reads it through an RMSNorm, so this is the
  error the next norm sees. Llama-family models carry *massive activations* (a few tokens, the first
  one and some delimiters, whose residual norm is 10-100x the median, e.g. 24,000 vs 220 in SmolLM2's
  layer 20): an unweighted mean spends most of its loss on those few tokens.
* ``"token-max"`` (default): as ``"token"``, but divided by the larger of the teacher's stream and the
  student's input stream at that token. With ``inputs="converted"`` the student's earlier layers can
  create a massive activation the teacher does not have (seen in SmolLM2 after layer 11); the teacher's
  norm there is ordinary, so ``"token"`` would weight that token's (large, mostly harmless: the next
  RMSNorm divides it away) error heavily. Elsewhere the two weightings agree.
* ``"energy"``: the plain mean squared error divided by the mean squared norm of the teacher's residual
  stream entering the layer, E||diff||^2 / E||h_i||^2 (the currency of the conversion's per-layer errors).

Only Q and K enter the attention nonlinearly: with ``solve_o`` (default) each layer ends with o_proj
set to its exact weighted least-squares optimum given the trained Q, K and V (Adam only approaches it
in 150 steps), kept where the held-out error falls.

Errors are reported in the chosen weighting, on a held-out slice of the calibration sequences that is
never trained on; it drives early stopping and the best state of each layer is kept (so a layer never
ends worse on held-out text than it started).

Memory does not grow with depth: only the current layer's inputs and targets are held (a few
``[N, T, d]`` float32 tensors on the host), and only the current layer's two blocks are moved to
``device`` (CUDA when present), in float32 whatever the models' dtype (Adam on float32 masters; a
bf16 / fp16 teacher computes exactly as its float32 copy would). Moving never converts a tensor in
place (:func:`gqa.convert.calibrated.placement.placed`): each parameter points at a moved copy for
the length of its layer and gets its own tensor back afterwards, the trained attention weights
copied into the student's tensors. Tensors the student shares with the teacher
(``reduce_kv_heads(share_unchanged=True)``) thus stay shared and unchanged, and the teacher is never
modified. Inputs are captured with forward hooks on the models' own modules and
every block / attention call replays the exact arguments the model's forward passed, so this module
never re-implements a forward.

Head mapping: query head h reads KV head h // (Hq // Hkv) in both models; shapes are not changed.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from gqa.convert.calibrated.placement import placed, upcast_forward
from gqa.errors import GQAUserError
from gqa.units import derived_seed

__all__ = [
    "DISTILL_PARAMS",
    "DISTILL_INPUTS",
    "DISTILL_LOSSES",
    "DISTILL_WEIGHTINGS",
    "HOLDOUT_FRACTION",
    "min_sequences",
    "LayerDistillation",
    "DistillReport",
    "distill_local",
]

DISTILL_PARAMS = ("qkvo", "kv", "qkvo-mlp")
DISTILL_INPUTS = ("original", "converted")
DISTILL_LOSSES = ("attention", "block")
DISTILL_WEIGHTINGS = ("token", "energy", "token-max")
#: Calibration sequences held out from training, for early stopping and the reported errors.
HOLDOUT_FRACTION = 0.1


def min_sequences(holdout_fraction: float = HOLDOUT_FRACTION) -> int:
    """The fewest calibration sequences that give a training slice and a held-out one (>= 1 each)."""
    n = 1
    while holdout_fraction > 0 and (round(n * holdout_fraction) < 1 or n - round(n * holdout_fraction) < 1):
        n += 1
    return n


@dataclass
class LayerDistillation:
    """One layer: held-out error before and after (in the run's weighting), steps run, seconds."""

    layer: int  # the first layer of its window
    error_before: float
    error_after: float
    steps: int
    stopped_early: bool
    seconds: float
    train_error_before: float | None = None
    o_solved: bool = False  # o_proj replaced by its least-squares optimum (``solve_o``)
    window: int = 1  # layers fitted together: layer .. layer + window - 1


@dataclass
class DistillReport:
    """What :func:`distill_local` did; ``to_dict()`` is JSON-ready."""

    params: str
    inputs: str
    loss: str
    weighting: str
    steps: int
    lr: float
    batch_size: int
    seq_len: int
    train_sequences: int
    holdout_sequences: int
    seed: int
    device: str
    solve_o: bool = False
    window: int = 1
    seconds: float = 0.0
    layers: list[LayerDistillation] = field(default_factory=list)

    @property
    def error_before(self) -> float:
        """Sum over layers of the held-out error before distillation."""
        return sum(layer.error_before for layer in self.layers)

    @property
    def error_after(self) -> float:
        return sum(layer.error_after for layer in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["error_before_total"] = self.error_before
        d["error_after_total"] = self.error_after
        return d


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted input is captured."""


def _to(obj, device):
    """Move every tensor inside ``obj`` (tuples, lists, dicts, objects with tensor attributes) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if hasattr(obj, "__dict__") and any(isinstance(v, torch.Tensor) for v in vars(obj).values()):
        new = copy.copy(obj)
        for k, v in vars(obj).items():
            if isinstance(v, torch.Tensor):
                setattr(new, k, v.to(device))
        return new
    return obj


class _CallArgs:
    """The extra arguments (after the hidden states) that the model's own forward passes to a block and
    to its attention, per batch size, captured with hooks and cached: ``{B: (args, kwargs)}``."""

    def __init__(self, model, ids: torch.Tensor, device):
        self.model, self.ids, self.device = model, ids, device
        self.blocks: dict[int, tuple] = {}
        self.attns: dict[int, tuple] = {}

    @torch.no_grad()
    def block(self, b: int) -> tuple:
        if b not in self.blocks:
            seen = []

            def hook(_m, args, kwargs):
                seen.append((args[1:], kwargs))
                raise _Stop

            handle = self.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
            try:
                with upcast_forward(self.model, torch.float32):
                    self.model(self.ids[:b].to(next(self.model.parameters()).device))
            except _Stop:
                pass
            finally:
                handle.remove()
            self.blocks[b] = _to(seen[0], self.device)
        return self.blocks[b]

    @torch.no_grad()
    def attn(self, block, h: torch.Tensor) -> tuple:
        """The arguments ``block`` passes to ``block.attn`` for a batch shaped like ``h``."""
        b = h.shape[0]
        if b not in self.attns:
            seen = []

            def hook(_m, args, kwargs):
                seen.append((args[1:], kwargs))
                raise _Stop

            handle = block.attn.register_forward_pre_hook(hook, with_kwargs=True)
            args, kwargs = self.block(b)
            try:
                block(h.to(device=self.device, dtype=next(block.parameters()).dtype), *args, **kwargs)
            except _Stop:
                pass
            finally:
                handle.remove()
            self.attns[b] = _to(seen[0], self.device)
        return self.attns[b]


@torch.no_grad()
def _layer0_inputs(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """The residual stream entering layer 0 for every sequence: [N, T, d] float32 on the host."""
    seen: list = []

    def hook(_module, args):
        seen.append(args[0].detach())
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(hook, prepend=True)
    hidden = []
    try:
        for s in range(0, ids.shape[0], chunk):
            try:
                with upcast_forward(model, torch.float32):
                    model(ids[s : s + chunk].to(next(model.parameters()).device))
            except _Stop:
                pass
            hidden.append(seen.pop().float().cpu())
    finally:
        handle.remove()
    return torch.cat(hidden)  # (N, T, d)


@torch.no_grad()
def _run_block(block, h: torch.Tensor, calls: _CallArgs, chunk: int, *, capture_attn: bool):
    """Run ``block`` on ``h`` [N, T, d] in chunks with the model's own call arguments; returns
    (block output, attention input, attention output), each [N, T, d] float32 on the host (the attention
    parts None unless ``capture_attn``)."""
    dtype = next(block.parameters()).dtype
    outs, a_in, a_out = [], [], []
    seen: list = []

    def post(_m, args, output):
        seen.append((args[0].detach(), output.detach()))

    handle = block.attn.register_forward_hook(post) if capture_attn else None
    try:
        for s in range(0, h.shape[0], chunk):
            x = h[s : s + chunk]
            args, kwargs = calls.block(x.shape[0])
            outs.append(block(x.to(device=calls.device, dtype=dtype), *args, **kwargs).float().cpu())
            if capture_attn:
                ai, ao = seen.pop()
                a_in.append(ai.float().cpu())
                a_out.append(ao.float().cpu())
    finally:
        if handle is not None:
            handle.remove()
    if not capture_attn:
        return torch.cat(outs), None, None
    return torch.cat(outs), torch.cat(a_in), torch.cat(a_out)


def _check(
    teacher, student, calib_ids, params, inputs, loss, weighting, steps, lr, batch_size, holdout_fraction, window
) -> torch.Tensor:
    if weighting not in DISTILL_WEIGHTINGS:
        raise GQAUserError(f"unknown distill weighting {weighting!r}; use one of {', '.join(DISTILL_WEIGHTINGS)}")
    if params not in DISTILL_PARAMS:
        raise GQAUserError(f"unknown distill params {params!r}; use one of {', '.join(DISTILL_PARAMS)}")
    if inputs not in DISTILL_INPUTS:
        raise GQAUserError(f"unknown distill inputs {inputs!r}; use one of {', '.join(DISTILL_INPUTS)}")
    if loss not in DISTILL_LOSSES:
        raise GQAUserError(f"unknown distill loss {loss!r}; use one of {', '.join(DISTILL_LOSSES)}")
    if params == "qkvo-mlp" and loss != "block":
        raise GQAUserError(
            "distill params 'qkvo-mlp' moves the MLP, so it matches the block's output: use loss='block'"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise GQAUserError(f"distill steps must be an integer >= 1, got {steps!r}; e.g. 150")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise GQAUserError(f"distill window must be an integer >= 1 (layers fitted together), got {window!r}; e.g. 2")
    if window > 1 and loss != "block":
        raise GQAUserError(
            f"a distill window of {window} layers matches the stream leaving the window: use loss='block'"
        )
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise GQAUserError(f"distill lr must be a positive number, got {lr!r}; e.g. 3e-3")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GQAUserError(f"distill batch size must be an integer >= 1, got {batch_size!r}; e.g. 8")
    if not (isinstance(holdout_fraction, (int, float)) and 0 <= holdout_fraction < 1):
        raise GQAUserError(f"holdout fraction must be in [0, 1), got {holdout_fraction!r}; e.g. 0.1")
    for name, m in (("teacher", teacher), ("student", student)):
        if not hasattr(m, "layers") or not all(hasattr(b, "attn") for b in m.layers):
            raise GQAUserError(
                f"the {name} is a {type(m).__name__}; local distillation needs gqa.GQAForCausalLM models"
            )
    if len(teacher.layers) != len(student.layers):
        raise GQAUserError(
            f"teacher has {len(teacher.layers)} layers, student {len(student.layers)}; "
            "distil a converted model from the model it was converted from"
        )
    ids = torch.as_tensor(calib_ids)
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        raise GQAUserError(
            f"calibration ids must be a non-empty integer tensor [N, T], got {tuple(ids.shape)} {ids.dtype}"
        )
    vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise GQAUserError(f"token id {int(ids.max())} is outside the vocabulary ({vocab}); use the model's tokenizer")
    if ids.shape[0] < min_sequences(holdout_fraction):
        raise GQAUserError(
            f"{ids.shape[0]} calibration sequences cannot give both a training and a held-out slice at "
            f"holdout fraction {holdout_fraction}; give more calibration tokens (--calib-tokens): at least "
            f"{min_sequences(holdout_fraction)} sequences"
        )
    return ids.long()


def _check_not_shared(teacher, student, params: str) -> None:
    """Training writes the student's attention weights in place: they must not be the teacher's memory.
    With ``params="qkvo-mlp"`` an MLP still shared with the teacher becomes the student's own copy."""
    teacher_memory = {p.untyped_storage().data_ptr() for p in teacher.parameters() if p.numel()}

    def shared(module) -> bool:
        return any(p.numel() and p.untyped_storage().data_ptr() in teacher_memory for p in module.parameters())

    for i, block in enumerate(student.layers):
        if params == "qkvo-mlp" and shared(block.mlp):
            block.mlp = copy.deepcopy(block.mlp)  # new storage: training it leaves the teacher's MLP as it was
        attention = _trainable(block, "qkvo" if params == "qkvo-mlp" else params)
        if any(p.numel() and p.untyped_storage().data_ptr() in teacher_memory for p in attention):
            raise GQAUserError(
                f"the student's layer {i} attention weights are the teacher's own tensors; distil a converted "
                "copy (reduce_kv_heads gives one), not a model that shares its attention with the teacher"
            )


def _trainable(block, params: str) -> list[torch.nn.Parameter]:
    attn = block.attn
    if params == "kv":
        return [p for m in (attn.k_proj, attn.v_proj) for p in m.parameters()]
    if params == "qkvo-mlp":
        return [*attn.parameters(), *block.mlp.parameters()]
    return list(attn.parameters())


def distill_local(
    teacher,
    student,
    calib_ids,
    *,
    params: str = "qkvo",
    inputs: str = "converted",
    loss: str | None = None,
    weighting: str = "token-max",
    steps: int = 150,
    lr: float = 3e-3,
    batch_size: int = 8,
    holdout_fraction: float = HOLDOUT_FRACTION,
    eval_every: int | None = None,
    patience: int = 3,
    seed: int = 0,
    progress: bool = True,
    solve_o: bool = True,
    window: int = 1,
    device: str | torch.device | None = None,
) -> DistillReport:
    """Fit ``student``'s attention layer by layer to ``teacher``'s on calibration text (in place).

    teacher, student: :class:`gqa.GQAForCausalLM` with the same number of layers and width (the
        student typically has fewer KV heads); the teacher is not modified.
    calib_ids: int64 ``[N, T]`` calibration sequences; a seeded ``holdout_fraction`` of them is held
        out for the error reported and early stopping.
    params: ``"qkvo"`` (all attention parameters), ``"kv"`` (only the K and V projections) or ``"qkvo-mlp"``
        (the attention and the MLP of each layer, fitted to the residual stream leaving the block).
    inputs: ``"original"`` (the teacher's inputs to each layer) or ``"converted"`` (the student's own
        inputs after its earlier layers were distilled; targets then include the drift, see module doc).
    loss: ``"attention"`` (post-attention residual) or ``"block"`` (the block's output, MLP included);
        default ``"block"`` for ``params="qkvo-mlp"`` or ``window > 1`` (the only loss they take), else
        ``"attention"``.
    weighting: ``"token-max"`` (per-token relative error, bounded by the student's own stream),
        ``"token"`` (per-token relative error) or ``"energy"`` (MSE over the mean residual energy), see
        the module doc.
    steps, lr, batch_size: Adam steps per layer with a cosine learning rate from ``lr`` to 0, on
        batches of ``batch_size`` sequences.
    eval_every: steps between held-out evaluations (default steps // 10); training of a layer stops
        after ``patience`` evaluations without improvement and its best state is kept.
    solve_o: after Adam, set o_proj to its exact weighted least-squares optimum given the trained Q, K
        and V (one linear solve per layer), kept only where the held-out error falls. Applies to
        ``params="qkvo"`` with ``loss="attention"`` (with ``"block"`` the MLP makes it nonlinear).
    window: consecutive layers fitted together against the stream leaving them (see the module doc);
        each window gets ``steps`` steps and one :class:`LayerDistillation` entry.
    device: where each layer is trained (default: CUDA when available, else CPU). Only the current
        layer's blocks visit the device; both models are left where they were.
    Returns a :class:`DistillReport`. Same arguments and seed give the same student.
    """
    from gqa.progress import progress as progress_bar

    if loss is None:
        loss = "block" if params == "qkvo-mlp" or window != 1 else "attention"
    ids = _check(
        teacher, student, calib_ids, params, inputs, loss, weighting, steps, lr, batch_size, holdout_fraction, window
    )
    _check_not_shared(teacher, student, params)
    from gqa.units import check_seed, parse_device

    check_seed(seed)
    device = parse_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    n = ids.shape[0]
    n_hold = round(n * holdout_fraction)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ids = ids[order]  # the first n - n_hold sequences train, the rest are held out
    n_train = n - n_hold
    batch = min(batch_size, n_train)
    eval_every = eval_every or max(1, steps // 10)
    report = DistillReport(
        params, inputs, loss, weighting, steps, float(lr), batch, ids.shape[1], n_train, n_hold, seed, str(device),
        solve_o=solve_o and loss == "attention" and params == "qkvo", window=window,
    )
    was_training = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    grad_flags = {p: p.requires_grad for p in student.parameters()}
    try:
        calls = _CallArgs(teacher, ids, device)
        h_t = _layer0_inputs(teacher, ids, batch)  # (N, T, d)
        h_s = _layer0_inputs(student, ids, batch) if inputs == "converted" else h_t
        for i in range(0, len(teacher.layers), window):
            result, h_t, h_s = _distill_layer(
                i, teacher.layers[i : i + window], student.layers[i : i + window], h_t, h_s, calls, n_train, batch,
                params=params, inputs=inputs, loss=loss, weighting=weighting, steps=steps, lr=lr, eval_every=eval_every,
                patience=patience, seed=seed, progress=progress, solve_o=solve_o, progress_bar=progress_bar,
                n_layers=len(teacher.layers),
            )  # fmt: skip
            report.layers.append(result)
    finally:
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        teacher.train(was_training[0])
        student.train(was_training[1])
    report.seconds = round(time.perf_counter() - t_start, 2)
    return report


def _distill_layer(
    i, t_blocks, s_blocks, h_t, h_s, calls, n_train, batch, *, params, inputs, loss, weighting, steps, lr,
    eval_every, patience, seed, progress, progress_bar, n_layers, solve_o,
):  # fmt: skip
    """Distil layers i .. i + len(s_blocks) - 1 together (one, unless a window); returns (LayerDistillation,
    teacher stream after them, student stream after them)."""
    t0 = time.perf_counter()
    device = calls.device
    s_block = s_blocks[-1]  # the one block of an attention loss (a window takes the block loss)
    trainable = [p for block in s_blocks for p in _trainable(block, params)]
    # The blocks in float32 on the device for this layer (Adam on fp32 masters whatever the checkpoint's
    # dtype); on exit every tensor is the original again, the trained values copied into the student's own.
    with placed(*t_blocks, *s_blocks, device=device, dtype=torch.float32, write_back=trainable):
        h_t_in = h_t
        for t_block in t_blocks[:-1]:
            h_t = _run_block(t_block, h_t, calls, batch, capture_attn=False)[0]
        h_t_next, a_t, o_t = _run_block(t_blocks[-1], h_t, calls, batch, capture_attn=True)
        if inputs == "converted" and loss == "attention":
            a_s = _run_block(s_block, h_s, calls, batch, capture_attn=True)[1]
        else:
            a_s = a_t  # same residual stream, same (unchanged) attn_norm
        if loss == "attention":
            x_all = a_s  # (N, T, d) what the student's attention reads
            target = o_t + (h_t - h_s) if inputs == "converted" else o_t  # teacher's post-attention residual - h'

            def forward(x):
                args, kwargs = calls.attn(s_block, h_s[: x.shape[0]])
                return s_block.attn(x, *args, **kwargs)
        else:
            x_all, target = h_s, h_t_next

            def forward(x):
                args, kwargs = calls.block(x.shape[0])
                for block in s_blocks:
                    x = block(x, *args, **kwargs)
                return x

        # Per-token weights [N, T]: 1 / ||teacher's residual stream||^2 at each token ("token"), the larger of
        # that and the student's input stream ("token-max"), or one constant 1 / E||h_i||^2 ("energy"); the
        # loss is the weighted mean of per-token squared errors.
        if weighting in ("token", "token-max"):
            stream = h_t_next if loss == "block" else h_t + o_t
            norm2 = stream.pow(2).sum(-1)
            if weighting == "token-max":
                norm2 = torch.maximum(norm2, h_s.pow(2).sum(-1))
            weights = 1.0 / norm2.clamp_min(1e-30)
            del stream, norm2
        else:
            energy = float(h_t_in[:n_train].double().pow(2).sum(-1).mean())
            weights = torch.full(h_t.shape[:2], 1.0 / max(energy, 1e-30))
        del a_t, o_t

        def error(lo: int, hi: int) -> float:
            if hi <= lo:
                return float("nan")
            total, count = 0.0, 0
            with torch.no_grad():
                for s in range(lo, hi, batch):
                    x = x_all[s : min(s + batch, hi)].to(device)
                    y = target[s : min(s + batch, hi)].to(device)
                    w = weights[s : min(s + batch, hi)].to(device)
                    total += float(((forward(x) - y).double().pow(2).sum(-1) * w).sum())
                    count += y.shape[0] * y.shape[1]
            return total / count

        n_all = x_all.shape[0]
        holdout = (n_train, n_all) if n_all > n_train else (0, n_train)  # no holdout: score on training
        for p in s_block.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        before = error(*holdout)
        train_before = error(0, n_train) if holdout[0] != 0 else before
        best_err, best_state, since_best, done = before, _snapshot(trainable), 0, 0
        stopped = False
        optimizer = torch.optim.Adam(trainable, lr=lr)
        gen = torch.Generator().manual_seed(derived_seed(seed, i))
        bar = progress_bar(total=steps, desc=f"distill layer {i + 1}{f'-{i + len(s_blocks)}' if len(s_blocks) > 1 else ''}/{n_layers}", unit="step", enabled=progress)
        try:
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))  # cosine to 0
                rows = torch.randint(0, n_train, (batch,), generator=gen)
                x, y, w = x_all[rows].to(device), target[rows].to(device), weights[rows].to(device)
                diff = forward(x) - y  # (B, T, d)
                step_loss = (diff.pow(2).sum(-1) * w).mean()
                optimizer.zero_grad(set_to_none=True)
                step_loss.backward()
                optimizer.step()
                done = step + 1
                bar.update(1)
                if done % eval_every == 0 or done == steps:
                    err = error(*holdout)
                    bar.set_postfix(heldout=err, before=before)
                    if err < best_err:
                        best_err, best_state, since_best = err, _snapshot(trainable), 0
                    else:
                        since_best += 1
                        if since_best >= patience and done < steps:
                            stopped = True
                            break
        finally:
            bar.close()
        _restore(trainable, best_state)
        for p in trainable:
            p.grad = None
        o_solved = False
        if solve_o and loss == "attention" and params == "qkvo":
            # The attention output is linear in o_proj: after Adam, its exact weighted least-squares optimum
            # (given the trained Q, K, V) is one solve away. Kept only if the held-out error improves.
            o_params = list(s_block.attn.o_proj.parameters())
            saved = _snapshot(o_params)
            _solve_o_proj(s_block.attn.o_proj, forward, x_all, target, weights, n_train, batch, device)
            err = error(*holdout)
            if err < best_err:
                best_err, o_solved = err, True
            else:
                _restore(o_params, saved)
        if inputs == "converted":
            h_s_next = h_s
            for block in s_blocks:
                h_s_next = _run_block(block, h_s_next, calls, batch, capture_attn=False)[0]
        else:
            h_s_next = h_t_next
    result = LayerDistillation(
        layer=i,
        error_before=before,
        error_after=best_err,
        steps=done,
        stopped_early=stopped,
        seconds=round(time.perf_counter() - t0, 2),
        train_error_before=train_before,
        o_solved=o_solved,
        window=len(s_blocks),
    )
    return result, h_t_next, h_s_next


@torch.no_grad()
def _solve_o_proj(o_proj, forward, x_all, target, weights, n_train, batch, device, ridge=1e-4):
    """Set ``o_proj`` to the weighted least-squares optimum given the rest of the attention (exact: the
    output is linear in it): min_W sum_t w_t ||W z_t + b - (y_t)||^2 over the training sequences."""
    seen = []
    handle = o_proj.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    has_bias = o_proj.bias is not None
    k = o_proj.in_features + int(has_bias)
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    cross = torch.zeros(k, o_proj.out_features, dtype=torch.float64, device=device)
    try:
        for s in range(0, n_train, batch):
            x = x_all[s : min(s + batch, n_train)].to(device)
            y = target[s : min(s + batch, n_train)].to(device)
            w = weights[s : min(s + batch, n_train)].to(device)
            forward(x)
            z = seen.pop().flatten(0, 1).double()
            if has_bias:
                z = torch.cat([z, z.new_ones(z.shape[0], 1)], 1)
            wz = z * w.flatten().double()[:, None]
            gram += wz.T @ z
            cross += wz.T @ y.flatten(0, 1).double()
    finally:
        handle.remove()
    gram += ridge * gram.diagonal().mean() * torch.eye(k, dtype=gram.dtype, device=device)
    sol = torch.linalg.solve(gram, cross)  # (k, out)
    o_proj.weight.copy_(sol[: o_proj.in_features].T.to(o_proj.weight.dtype))
    if has_bias:
        o_proj.bias.copy_(sol[-1].to(o_proj.bias.dtype))


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _restore(params: list[torch.nn.Parameter], state: list[torch.Tensor]) -> None:
    for p, s in zip(params, state, strict=True):
        p.copy_(s)
