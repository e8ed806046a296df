"""``nn.MultiheadAttention``: ``sum_n c_n**2`` of its projections, Linear-type statistics.

Every parameter of the layer enters through a linear map applied to each example's own
rows, so its contributions follow from that map's input X and output gradient G as for
``nn.Linear`` (:func:`~msvag_mb.extensions.linear.linear_sum_grad_squared`):

* the in-projection ``[q; k; v] = W_in x + b_in``: the packed ``in_proj_weight`` ``(3E, E)``
  in one map where query, key and value are one tensor (self-attention), else in row
  blocks (q, k, v; or q and a packed k-v where key is value); the blocks' rows are
  disjoint, so the statistic of the whole weight is that of its blocks, stacked; with
  ``kdim``/``vdim`` other than E, ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``;
* ``bias_k``, ``bias_v``: one extra key/value row per example, equal to the parameter:
  example n's contribution is the gradient of that row;
* ``out_proj`` (weight and bias) on the heads' concatenated outputs. ``out_proj`` is a
  child module that the layer never calls (it uses ``out_proj.weight`` directly), so this
  extension claims it (:meth:`~msvag_mb.extensions.core.ModuleExtension.claimed_submodules`).

The attention in between (scores, masks, softmax, dropout) mixes the positions of one
example, never the examples. While the statistics are collected the module's ``forward``
is replaced by :func:`attention_forward`, an exact re-implementation of
``F.multi_head_attention_forward`` built from ``F.linear`` calls whose output gradients are
hooked (``F.scaled_dot_product_attention`` where ``need_weights=False``; dropout on the
attention weights in train mode is drawn by it, elementwise, so the examples stay
independent). It takes the examples along the batch axis ``batch_first`` declares;
unbatched and nested inputs are refused.

A parameter used several times in one forward pass (the layer called again, as in a block
applied repeatedly, or ``out_proj.weight`` tied to another layer) gets each call's
per-example contributions instead, added to those of its other uses before squaring
(:mod:`~msvag_mb.extensions.reuse`): ``G_n^T X_n`` kept factored for a weight,
``sum_t G_nt`` for a bias, the row's gradient for ``bias_k``/``bias_v``; a call that uses
the packed in-projection in row blocks hands over one use with each block at its rows.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from msvag_mb.model_checks import UnsupportedModelError

from .core import LayerContext, ModuleExtension, Removable, register_extension
from .linear import linear_sum_grad_squared
from .reuse import DenseUse, ProductUse, RowBlocksUse


class _Statistics:
    """Collects the statistics of one call during the backward pass.

    A parameter used once (:meth:`LayerContext.reused` is without it) gets its
    ``sum_n c_n**2``; one used several times in the forward pass (the layer called again,
    tied to another layer) gets this call's per-example contributions handed over as one
    use, added to its other uses' before squaring. A parameter the call uses in row blocks
    (the packed in-projection on distinct query, key and value, :meth:`row_blocks`) is
    closed once its gradient in this call is complete: the blocks that reached the loss
    are stacked at their rows (zeros elsewhere, which got no gradient), or handed over
    together as a :class:`~msvag_mb.extensions.reuse.RowBlocksUse`."""

    def __init__(self, context: LayerContext) -> None:
        self.context = context
        self.blocks: dict[str, dict[int, object]] = {}
        self.in_blocks: set[str] = set()

    def expect(self, name: str, offset: int) -> bool:
        """Announce a block of ``name`` at row ``offset``; ``False``: not requested."""
        if name not in self.context.requested:
            return False
        self.blocks.setdefault(name, {})[offset] = None
        return True

    def reused(self) -> frozenset[str]:
        """The parameters whose contributions are handed over as uses (decided before the
        backward pass)."""
        return self.context.reused()

    def row_blocks(self, param: Tensor, name: str) -> Tensor:
        """``param`` as this call will slice it into row blocks: an alias whose gradient
        hook runs after every block that reached the loss has reported (autograd runs a
        node once all its inputs' producers have run), and closes ``name``."""
        if name not in self.context.requested:
            return param
        alias = param.view_as(param)
        if alias.requires_grad:
            self.in_blocks.add(name)
            alias.register_hook(lambda grad: self._close(name))
        return alias

    def add(self, name: str, offset: int, value: Tensor) -> None:
        """One block's ``sum_n c_n**2``."""
        self.blocks[name][offset] = value
        if name not in self.in_blocks:
            self.context.emit(name, value)

    def add_use(self, name: str, offset: int, use) -> None:
        """One block's per-example contributions (a
        :class:`~msvag_mb.extensions.reuse.PerExampleUse`)."""
        self.blocks[name][offset] = use
        if name not in self.in_blocks:
            self.context.add_use(name, use)

    def _close(self, name: str) -> None:
        """This call's statistic of ``name`` from the blocks that got a gradient."""
        arrived = {o: v for o, v in self.blocks[name].items() if v is not None}
        if not arrived:
            return
        param = self.context.parameters[name]
        if name in self.reused():
            combined = RowBlocksUse(param.shape)
            for offset, use in arrived.items():
                combined.place(offset, use)
            self.context.add_use(name, combined)
            return
        total = next(iter(arrived.values())).new_zeros(param.shape)
        for offset, value in arrived.items():
            total[offset:offset + value.shape[0]] = value
        self.context.emit(name, total)


def _report_linear(statistics: _Statistics, inputs: Tensor, grad: Tensor,
                   names: tuple[str | None, str | None], offsets: tuple[int, int]) -> None:
    """The statistics of a tracked ``F.linear`` (``names``: weight's and bias's, ``None``
    where not requested) from its batch-first input and output gradient: per-example
    uses (``G_n^T X_n`` factored, ``sum_t G_nt``) for reused parameters, else
    ``sum_n c_n**2`` by the Linear layer's maths."""
    reused = statistics.reused()
    single = [name is not None and name not in reused for name in names]
    if any(single):
        squares = linear_sum_grad_squared(inputs, grad, weight=single[0], bias=single[1])
        for name, offset, value in zip(names, offsets, squares):
            if value is not None:
                statistics.add(name, offset, value)
    if names[0] in reused:
        statistics.add_use(names[0], offsets[0], ProductUse(grad, inputs))
    if names[1] in reused:
        statistics.add_use(names[1], offsets[1], DenseUse(grad.sum(1)))


def tracked_linear(statistics: _Statistics, x: Tensor, weight: Tensor, bias: Tensor | None,
                   names: tuple[str, str], offsets: tuple[int, int] = (0, 0)) -> Tensor:
    """``F.linear(x, weight, bias)`` for batch-first ``x`` ``(B, T, in)``, reporting the
    statistics of ``weight`` and ``bias`` (rows from ``offsets`` of the parameters
    ``names``) from ``x`` and the output gradient."""
    y = F.linear(x, weight, bias)
    want_weight = statistics.expect(names[0], offsets[0])
    want_bias = bias is not None and statistics.expect(names[1], offsets[1])
    if (want_weight or want_bias) and y.requires_grad:
        version, dtype = x._version, weight.dtype
        wanted = (names[0] if want_weight else None, names[1] if want_bias else None)

        def on_output_gradient(grad: Tensor) -> None:
            if x._version != version:
                raise RuntimeError(
                    f"the input of layer '{statistics.context.name}' was modified in place "
                    "after the layer ran, so its per-example statistics cannot be computed; "
                    "avoid the in-place operation.")
            inputs = x.detach().to(dtype) if x.is_floating_point() else x.detach()
            _report_linear(statistics, inputs, grad.detach().to(dtype), wanted, offsets)

        y.register_hook(on_output_gradient)
    return y


def tracked_bias_row(statistics: _Statistics, parameter: Tensor, name: str,
                     batch: int) -> Tensor:
    """``bias_k``/``bias_v`` ``(1, 1, E)`` as one extra row per example ``(B, 1, E)``;
    example n's contribution is the gradient of its row."""
    rows = parameter.reshape(1, 1, -1).expand(batch, 1, parameter.shape[-1])

    def on_rows_gradient(grad: Tensor) -> None:
        contributions = grad.detach().to(parameter.dtype).reshape(batch, *parameter.shape)
        if name in statistics.reused():
            statistics.add_use(name, 0, DenseUse(contributions))
        else:
            statistics.add(name, 0, contributions.square().sum(0))

    if statistics.expect(name, 0) and rows.requires_grad:
        rows.register_hook(on_rows_gradient)
    return rows


def _batch_first(module: nn.MultiheadAttention, context: LayerContext,
                 tensor: Tensor, role: str) -> Tensor:
    """``(B, T, E)`` view of a query, key or value; refused unless the examples lie along
    the axis that ``batch_first`` declares."""
    if tensor.is_nested or tensor.dim() != 3:
        kind = "a nested tensor" if tensor.is_nested else \
            f"an unbatched {role} of shape {tuple(tensor.shape)}"
        raise UnsupportedModelError(
            f"layer '{context.name}' (MultiheadAttention) got {kind}; engine 'extensions' "
            "needs padded (B, T, E) or (T, B, E) inputs with the examples along the batch "
            "axis.")
    axis = 0 if module.batch_first else 1
    context.layouts.check_declared(tensor, context.name, "MultiheadAttention", axis)
    if tensor.shape[axis] != context.batch_size:
        raise UnsupportedModelError(
            f"layer '{context.name}' (MultiheadAttention) got a {role} with "
            f"{tensor.shape[axis]} along its batch axis, not the {context.batch_size} "
            "examples of the model's input; the examples must be the sequences.")
    return tensor if module.batch_first else tensor.transpose(0, 1)


def _in_projections(module: nn.MultiheadAttention, statistics: _Statistics, query: Tensor,
                    key: Tensor, value: Tensor, same: tuple[bool, bool]):
    """``(q, k, v)`` batch-first ``(B, T, E)``; ``same``: (query is key, key is value)."""
    e = module.embed_dim
    bias = module.in_proj_bias
    if bias is not None and not all(same):  # sliced into the blocks of q, k and v
        bias = statistics.row_blocks(bias, "in_proj_bias")
    biases = (None, None, None) if bias is None else (bias[:e], bias[e:2 * e], bias[2 * e:])
    if not module._qkv_same_embed_dim:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        return tuple(tracked_linear(statistics, x, w, b, (name, "in_proj_bias"), (0, i * e))
                     for i, (x, w, b, name) in enumerate(zip((query, key, value), weights,
                                                              biases, names)))
    weight, names = module.in_proj_weight, ("in_proj_weight", "in_proj_bias")
    if all(same):  # self-attention: one map for q, k and v
        return tracked_linear(statistics, query, weight, bias, names).chunk(3, dim=-1)
    weight = statistics.row_blocks(weight, names[0])
    q = tracked_linear(statistics, query, weight[:e], biases[0], names)
    if same[1]:  # key is value: one map for k and v
        kv_bias = None if bias is None else bias[e:]
        return (q, *tracked_linear(statistics, key, weight[e:], kv_bias, names, (e, e))
                .chunk(2, dim=-1))
    return (q, tracked_linear(statistics, key, weight[e:2 * e], biases[1], names, (e, e)),
            tracked_linear(statistics, value, weight[2 * e:], biases[2], names,
                           (2 * e, 2 * e)))


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: not attended) as an additive float mask, as torch does."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _merged_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int,
                 heads: int, extra_columns: int) -> Tensor | None:
    """``attn_mask`` ``(L, S)`` or ``(B*heads, L, S)`` plus ``key_padding_mask`` ``(B, S)``
    as one mask broadcastable to ``(B, heads, L, S + extra_columns)`` (the extra key rows
    of ``bias_k`` and ``add_zero_attn`` are attended by every query)."""
    if attn_mask is not None:
        attn_mask = attn_mask.view(1, 1, *attn_mask.shape) if attn_mask.dim() == 2 else \
            attn_mask.view(batch, heads, *attn_mask.shape[1:])
        attn_mask = F.pad(attn_mask, (0, extra_columns))
    if key_padding_mask is not None:
        padding = F.pad(key_padding_mask, (0, extra_columns)).view(batch, 1, 1, -1)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    return attn_mask


def _heads(x: Tensor, heads: int) -> Tensor:
    """``(B, T, E)`` -> ``(B, heads, T, E / heads)``."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _attend(module: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor,
            mask: Tensor | None, is_causal: bool, need_weights: bool):
    """``(heads' outputs (B, heads, L, d), attention weights (B, heads, L, S) or None)``;
    the operations of ``F.multi_head_attention_forward`` in its order."""
    dropout = module.dropout if module.training else 0.0
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal), None
    if is_causal and mask is None:
        raise AssertionError("FIXME: is_causal not implemented for need_weights")
    q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
    scores = q_scaled @ k.transpose(-2, -1)
    weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout)
    return weights @ v, weights


def _extra_key_rows(module: nn.MultiheadAttention, statistics: _Statistics, k: Tensor,
                    v: Tensor) -> tuple[Tensor, Tensor, int]:
    """``k``, ``v`` ``(B, heads, S, d)`` with the rows of ``bias_k``/``bias_v`` and of
    ``add_zero_attn`` appended, and how many rows were appended."""
    heads, batch = module.num_heads, k.shape[0]
    extra = 0
    if module.bias_k is not None:
        k = torch.cat([k, _heads(tracked_bias_row(statistics, module.bias_k, "bias_k",
                                                  batch), heads)], dim=2)
        v = torch.cat([v, _heads(tracked_bias_row(statistics, module.bias_v, "bias_v",
                                                  batch), heads)], dim=2)
        extra += 1
    if module.add_zero_attn:
        k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[-1])], dim=2)
        v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[-1])], dim=2)
        extra += 1
    return k, v, extra


def attention_forward(module: nn.MultiheadAttention, context: LayerContext, query: Tensor,
                      key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                      need_weights: bool = True, attn_mask: Tensor | None = None,
                      average_attn_weights: bool = True, is_causal: bool = False):
    """Drop-in for ``nn.MultiheadAttention.forward`` that reports the statistics."""
    context.count_call()
    same = (query is key, key is value)
    statistics = _Statistics(context)
    inputs = [_batch_first(module, context, t, role)
              for t, role in ((query, "query"), (key, "key"), (value, "value"))]
    q, k, v = _in_projections(module, statistics, *inputs, same)
    heads, batch = module.num_heads, q.shape[0]
    q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    k, v, extra = _extra_key_rows(module, statistics, k, v)
    key_padding_mask = _additive(key_padding_mask, q.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use "
                           "the Transformer module method `generate_square_subsequent_mask` "
                           "to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # torch passes the hint to scaled_dot_product_attention instead
    else:
        attn_mask = _additive(attn_mask, q.dtype)
        is_causal = is_causal and key_padding_mask is None
    mask = _merged_mask(attn_mask, key_padding_mask, batch, heads, extra)
    attended, weights = _attend(module, q, k, v, mask, is_causal, need_weights)
    merged = attended.transpose(1, 2).reshape(batch, -1, module.embed_dim)
    out_proj = module.out_proj
    output = tracked_linear(statistics, merged, out_proj.weight, out_proj.bias,
                            ("out_proj.weight", "out_proj.bias"))
    output = output if module.batch_first else output.transpose(0, 1)
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    context.layouts.register(output, 0 if module.batch_first else 1)
    if weights is not None:
        context.layouts.register(weights, 0)
    context.uses.record_call(context.name, (query, key, value, key_padding_mask, attn_mask),
                             (output, weights))
    return output, weights


class _RestoreForward:
    """Undo the temporary replacement of ``module.forward``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.own_forward = module.__dict__.get("forward")

    def remove(self) -> None:
        """Put the module's own ``forward`` back."""
        if self.own_forward is not None:
            self.module.forward = self.own_forward
        else:
            self.module.__dict__.pop("forward", None)


@register_extension
class MultiheadAttentionExtension(ModuleExtension):
    """``nn.MultiheadAttention``: packed or separate projections, biases, ``bias_k``/
    ``bias_v``, ``add_zero_attn``, masks, ``is_causal``, attention weights, dropout."""

    module_types = (nn.MultiheadAttention,)

    #: its calls hand over per-example contributions (:class:`_Statistics`): the layer may
    #: be called several times (a block applied repeatedly) or share a parameter with
    #: another layer
    supports_reuse = True

    def claimed_submodules(self, module: nn.Module) -> tuple[str, ...]:
        """``out_proj``: the layer uses its parameters without calling it."""
        return ("out_proj",)

    def parameter_names(self, module: nn.Module) -> frozenset[str]:
        """The projections' weights and biases, ``bias_k``, ``bias_v``, ``out_proj``'s."""
        return frozenset({"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                          "v_proj_weight", "bias_k", "bias_v", "out_proj.weight",
                          "out_proj.bias"})

    def output_layouts(self, module: nn.Module, input_axis: int | None,
                       output) -> list[tuple[Tensor, int]]:
        """The output in the layout ``batch_first`` declares, the weights along dim 0."""
        sequence, weights = output
        found = [(sequence, 0 if module.batch_first else 1)]
        return found + ([(weights, 0)] if weights is not None else [])

    def attach(self, module: nn.Module, context: LayerContext) -> list[Removable]:
        """Shadow the module's ``forward`` with :func:`attention_forward`."""
        restore = _RestoreForward(module)
        module.forward = functools.partial(attention_forward, module, context)
        return [restore]
