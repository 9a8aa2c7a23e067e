"""Products of two feature tensors: attention's ``q @ k.T`` and ``att @ v``.

A batched product ``A (..., M, K) @ B (..., K, N)``:

- channels on the contracted axis of both operands (``q @ k.transpose(-2, -1)``)
  form a bilinear form: each query channel is *dual* to the key channel it
  meets (the keys transform with the inverse transpose of the queries' map, so
  ``q k^T`` is unchanged). The batch positions along which the channels differ
  are the heads: each head gets a block element (``heads`` family), and its
  channels stay in that block;
- no channels on the contracted axis (``att @ v``, a sum over tokens): the
  output keeps the channels of the operand that has them, and the heads of the
  attention weights are linked to the blocks of the values they weigh;
- a parameter operand makes the product a layer (:mod:`.linear`).

``scaled_dot_product_attention`` is the composition of the two. The heads of
the query-key and of the value-output spaces of one attention share one block
family: a permutation of whole heads must move both.
"""

from __future__ import annotations

import torch

from .._labels import FIXED, Layout
from ._registry import ops, rule
from .elementwise import combine
from .linear import param_product


def _broadcast(w, arg, batch: tuple) -> torch.Tensor:
    """Full labels of a matmul operand, its batch axes broadcast to ``batch``."""
    shape = w.shape(arg)
    full = w.layout(arg).full(shape)
    if len(shape) == 1:
        return full
    return full.expand(*batch, *shape[-2:])


def bilinear(w, a_full: torch.Tensor, b_full: torch.Tensor, batch: tuple) -> torch.Tensor:
    """Pair the contracted channels of ``A (..., M, K)`` and ``B (..., K, N)``; heads per batch position.

    Returns the labels of the product over its batch axes (one block element
    per distinct block of channels).
    """
    qa = a_full[..., 0, :]  # channels along K at each batch position (constant along M)
    kb = b_full[..., :, 0]
    if not (torch.equal(a_full, qa.unsqueeze(-2).expand_as(a_full))
            and torch.equal(b_full, kb.unsqueeze(-1).expand_as(b_full))):
        w.fail("both operands carry channels on the contracted axis and on another axis")
    w.pair(qa.reshape(-1), kb.reshape(-1))
    w.read(qa)
    w.read(kb)
    flat = qa.reshape(-1, qa.shape[-1])
    blocks, which = torch.unique(flat, dim=0, return_inverse=True)
    family = w.new_family("heads", blocks.shape[0])
    for j in range(blocks.shape[0]):
        w.link(blocks[j], family[j].expand(blocks.shape[1]))
    return family[which].reshape(batch) if batch else family[which].reshape(())


def weighted_sum(w, att_full: torch.Tensor, v_full: torch.Tensor, batch: tuple) -> torch.Tensor:
    """``att (..., M, K) @ v (..., K, N)`` without channels on K: the output's labels ``(..., M, N)``."""
    att_rows = att_full[..., :, 0]  # labels of the weights, constant along K
    v_cols = v_full[..., 0, :]
    att_feat = bool((att_rows > FIXED).any())
    v_feat = bool((v_cols > FIXED).any())
    if att_feat and v_feat:
        # the weights' head elements (constant along M) meet the values' channels of that head
        heads = att_rows[..., 0]
        if not torch.equal(att_rows, heads.unsqueeze(-1).expand_as(att_rows)):
            w.fail("both operands of a product carry channels on different axes")
        w.link(v_cols.reshape(-1), heads.unsqueeze(-1).expand_as(v_cols).reshape(-1))
        w.read(v_cols)
        return v_cols.unsqueeze(-2).expand(*att_rows.shape, v_cols.shape[-1])
    if v_feat:
        return v_cols.unsqueeze(-2).expand(*att_rows.shape, v_cols.shape[-1])
    if att_feat:
        return att_rows.unsqueeze(-1).expand(*att_rows.shape, v_cols.shape[-1])
    return torch.full((*att_rows.shape, v_cols.shape[-1]), FIXED, dtype=torch.long)


def feature_product(w, node, left, right) -> Layout:
    la, lb = w.layout(left), w.layout(right)
    sa, sb = w.shape(left), w.shape(right)
    if len(sa) < 2 or len(sb) < 2:
        w.fail("a product with a vector operand")
    out_shape = w.shape(node)
    batch = tuple(out_shape[:-2])
    a_full, b_full = _broadcast(w, left, batch), _broadcast(w, right, batch)
    a_k = (len(sa) - 1) in la.feature_axes()
    b_k = (len(sb) - 2) in lb.feature_axes()
    if a_k and b_k:
        labels = bilinear(w, a_full, b_full, batch)
        full = labels.reshape(*batch, 1, 1).expand(out_shape) if batch else labels.expand(out_shape)
        return Layout.from_full(full)
    if a_k or b_k:
        side = left if a_k else right
        w.fix(w.layout(side).labels, reason=f"multiplied by a matrix that is not a parameter ({w.where()[2]})",
              warn=True)
        w.warn(f"{w.where()[0] or 'the top level of the model'}: {w.where()[2]} mixes channels with a "
               "matrix that is not a parameter; those channels keep each model's basis (the merge "
               "falls back to averaging there)")
    elif la.has_params or lb.has_params:
        w.fail("a product of a parameter used as a tensor with features")
    return Layout.from_full(weighted_sum(w, a_full, b_full, batch))


@rule(*ops("matmul", "mm", "bmm"))
def matmul(w, node) -> Layout:
    left, right = node.args[0], node.args[1]
    layer = param_product(w, node, left, right)
    if layer is not None:
        return layer
    return feature_product(w, node, left, right)


@rule(*ops("baddbmm", "addbmm"))
def baddbmm(w, node) -> Layout:
    """``self + batch1 @ batch2``."""
    product = feature_product(w, node, node.args[1], node.args[2])
    w.env[node] = product
    return combine(w, node, [node, node.args[0]], w.shape(node))


@rule(*ops("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"))
def sdpa(w, node):
    args = w.args(node)
    q, k, v, mask = args["query"], args["key"], args["value"], args.get("attn_mask")
    sq, sk = w.shape(q), w.shape(k)
    batch = tuple(sq[:-2])
    q_full = w.layout(q).full(sq)
    k_full = w.layout(k).full(sk)
    v_full = w.layout(v).full(w.shape(v))
    if len(sq) >= 3 and sk[-3] != sq[-3]:  # grouped-query attention: key/value heads are shared
        repeat = sq[-3] // sk[-3]
        k_full = k_full.repeat_interleave(repeat, dim=-3)
        v_full = v_full.repeat_interleave(repeat, dim=-3)
    k_full, v_full = k_full.expand(*batch, *sk[-2:]), v_full.expand(*batch, *v_full.shape[-2:])
    q_k = (len(sq) - 1) in w.layout(q).feature_axes()
    if not q_k:
        w.fail("queries without channels on their last axis")
    heads = bilinear(w, q_full, k_full.transpose(-1, -2), batch)
    scores = heads.reshape(*batch, 1, 1).expand(*batch, sq[-2], sk[-2])
    if mask is not None and isinstance(w.layout(mask), Layout) and not w.layout(mask).inert:
        # a learned bias added to the scores (relative positions): entries per head
        ms = w.shape(mask)
        mask_full = w.layout(mask).full(ms).expand(*batch, sq[-2], sk[-2])
        scores = w.unify(torch.stack([scores.reshape(-1), mask_full.reshape(-1)], 1)).reshape(scores.shape)
    out = weighted_sum(w, scores, v_full, batch)
    lay = Layout.from_full(out)
    if isinstance(w.t.shapes.get(node), list):
        return [lay] + [Layout.constant(FIXED, len(s), "constant") for s in w.t.shapes[node][1:]]
    return lay
