"""Building blocks of the retrieval head, one small module per role (S2-S4 of METHOD.md)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x (B, L, D) over the positions where mask (B, L) is True -> (B, D)."""
    x = torch.where(mask.unsqueeze(-1), x, 0)  # where, not multiply: padding may hold anything
    return x.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over the True positions of mask; every row must have at least one."""
    return scores.masked_fill(~mask, float("-inf")).softmax(dim)


class Projections(nn.Module):
    """CLIP's own output projections (x @ proj), frozen unless the run fine-tunes them."""

    def __init__(self, image_proj: Tensor, text_proj: Tensor, trainable: bool = False):
        super().__init__()
        if image_proj.shape[1] != text_proj.shape[1]:
            raise ValueError(f"projection widths differ: {tuple(image_proj.shape)} vs {tuple(text_proj.shape)}")
        self.image = nn.Parameter(image_proj.detach().clone().float(), requires_grad=trainable)  # (Dv, D)
        self.text = nn.Parameter(text_proj.detach().clone().float(), requires_grad=trainable)  # (Dt, D)

    def project_image(self, x: Tensor) -> Tensor:
        return x @ self.image

    def project_text(self, x: Tensor) -> Tensor:
        return x @ self.text


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI's CLIP blocks, needed to reuse their weights."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


# open_clip's ResidualAttentionBlock parameter names -> nn.TransformerEncoderLayer's (the same pre-LN block)
CLIP_BLOCK_NAMES = {
    "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias",
    "attn.in_proj_weight": "self_attn.in_proj_weight", "attn.in_proj_bias": "self_attn.in_proj_bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "norm2.weight", "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "linear1.weight", "mlp.c_fc.bias": "linear1.bias",
    "mlp.c_proj.weight": "linear2.weight", "mlp.c_proj.bias": "linear2.bias",
}


class TemporalEncoder(nn.Module):
    """S2 temporal: f = f0 + Enc(f0 + P[:F]), CLIP4Clip's seqTransf."""

    def __init__(self, dim: int, layers: int, heads: int, max_positions: int, dropout: float,
                 activation: str = "gelu"):
        super().__init__()
        self.position_embedding = nn.Parameter(torch.randn(max_positions, dim) * 0.01)  # (P, D)
        act = QuickGELU() if activation == "quick_gelu" else activation
        # pre-LN like CLIP's own blocks; no nested tensors so padded and unpadded inputs take one path
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation=act,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    @torch.no_grad()
    def load_clip_blocks(self, state: dict[str, Tensor]) -> int:
        """CLIP4Clip's initialisation: the first blocks of CLIP's text transformer and its positional embedding.

        state holds open_clip names: "positional_embedding" (77, D) and "resblocks.{i}.<CLIP_BLOCK_NAMES key>".
        Layers beyond the blocks given keep their random start; rows beyond the 77 positions too. The caller
        makes the head count and activation equal to CLIP's (the weights mean nothing otherwise).
        Returns the number of blocks copied.
        """
        pos = state["positional_embedding"]
        if pos.shape[-1] != self.position_embedding.shape[-1]:
            raise ValueError(f"CLIP's text transformer is {pos.shape[-1]} wide, the temporal encoder "
                             f"{self.position_embedding.shape[-1]}: they cannot share weights")
        rows = min(len(pos), len(self.position_embedding))
        self.position_embedding[:rows] = pos[:rows]
        copied = 0
        for i, layer in enumerate(self.encoder.layers):
            prefix = f"resblocks.{i}."
            if prefix + "ln_1.weight" not in state:
                break
            ours = layer.state_dict()
            for clip_name, name in CLIP_BLOCK_NAMES.items():
                ours[name] = state[prefix + clip_name].to(ours[name].dtype)
            layer.load_state_dict(ours)
            copied += 1
        return copied

    def forward(self, f0: Tensor, mask: Tensor) -> Tensor:
        n_frames = f0.shape[1]
        if n_frames > len(self.position_embedding):
            raise ValueError(f"{n_frames} frames exceed the position table ({len(self.position_embedding)}); "
                             "raise HeadConfig.max_positions")
        x = f0 + self.position_embedding[:n_frames]  # (B, F, D)
        return f0 + self.encoder(x, src_key_padding_mask=~mask)  # (B, F, D)


class LocalEnhancer(nn.Module):
    """S2 local enhancement: h_i = f_i + LSTM(concat(v_bar, f_i))_i."""

    def __init__(self, dim: int):
        super().__init__()
        self.lstm = nn.LSTM(2 * dim, dim, batch_first=True)

    def forward(self, f: Tensor, v_bar: Tensor) -> Tensor:
        x = torch.cat([v_bar.unsqueeze(1).expand_as(f), f], dim=-1)  # (B, F, 2D)
        # unidirectional and padded at the end: padding steps come after every valid step, so they cannot
        # reach a valid output (no packing needed, and no lengths to copy to the CPU)
        out, _ = self.lstm(x)  # (B, F, D)
        return f + out  # the residual keeps the CLIP signal while the LSTM is untrained


class FrameWeights(nn.Module):
    """S2 adaptive weights: a_i = sigmoid(FC2(SelfAttn(FC1(h_i)))), one weight in (0, 1) per frame.

    Returns the pre-sigmoid logits x (B, F); a_i = sigmoid(x_i). Callers normalise the weights over valid
    frames as softmax(logsigmoid(x)), which equals a / sum(a) but cannot become 0/0 when every sigmoid
    underflows (a training run saw x ~ -88 on all frames of a video, then NaN).
    """

    def __init__(self, dim: int, heads: int, residual: bool = False, norm: bool = False):
        """residual: x + SelfAttn(x) instead of SelfAttn(x). As the patent writes it, an untrained
        self-attention is close to uniform, so it hands every frame of a video nearly the same vector and
        fc2 the same logit: the weights start uniform with a near-zero gradient to tell frames apart
        (measured on the third set: within-video logit std 0.0003 at init). The residual keeps each frame's own feature.
        norm: a LayerNorm on h before FC1, so the logits do not grow with the temporal features' norm (which grows
        in training: to 5-13x CLIP's at 1,000 steps, where the patent's logits reach the hundreds and saturate)."""
        super().__init__()
        self.residual = residual
        self.norm = nn.LayerNorm(dim) if norm else None
        self.fc1 = nn.Linear(dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc2 = nn.Linear(dim, 1)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        x = self.fc1(self.norm(h) if self.norm is not None else h)  # (B, F, D)
        y, _ = self.attn(x, x, x, key_padding_mask=~mask, need_weights=False)  # (B, F, D)
        return self.fc2(x + y if self.residual else y).squeeze(-1)  # (B, F) logits; padding is masked by the caller


def normalised_frame_weights(logits: Tensor, mask: Tensor) -> Tensor:
    """sigmoid(logits) / sum over valid frames, computed as a softmax of logsigmoid: finite for any logits."""
    return masked_softmax(F.logsigmoid(logits.float()), mask)  # (B, F), 0 on padding


class KeywordAttention(nn.Module):
    """S3: w_e = w + Dropout(MHA(Q=LN(w), K=LN(k), V=LN(k))); a caption with no keywords keeps w_e = w."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln_words = nn.LayerNorm(dim)
        self.ln_keywords = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.drop = nn.Dropout(dropout)
        # Identity start (as S4 and the LSTM residual): with a zero output projection an untrained S3
        # leaves w_e = w, instead of adding a random mix of keyword features to every word.
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, w: Tensor, k: Tensor, k_mask: Tensor) -> Tensor:
        if k.shape[1] == 0:
            return w
        has_kw = k_mask.any(1)  # (B,)
        # a row with every key masked is an all -inf softmax (NaN): let keyword-less captions attend to
        # their padding and drop that update below, so their w_e is w exactly
        key_padding = ~(k_mask | ~has_kw.unsqueeze(1))  # (B, K)
        k = self.ln_keywords(k)  # (B, K, D)
        delta, _ = self.attn(self.ln_words(w), k, k, key_padding_mask=key_padding, need_weights=False)  # (B, N, D)
        return w + torch.where(has_kw[:, None, None], self.drop(delta), 0)  # (B, N, D)


class TextConditionedPool(nn.Module):
    """S4: v = LN2(z + Dropout(Linear(z))), z = LN1(MHA(Q=t, K=f, V=f)) (X-Pool with the patent's two LayerNorms).

    v depends on the (text, video) pair. For all Nt x Nv pairs the single-query attention is a softmax over
    frames of (t W_q)(f W_k)^T per head, so nothing larger than (Nt, Nv, H, F) and (Nt, Nv, D) is built.
    With aligned=True text i is pooled over video i only, giving (N, D).
    """

    def __init__(self, dim: int, heads: int, dropout: float, init: str = "identity", norm: str = "none"):
        super().__init__()
        if norm not in ("none", "input"):
            raise ValueError(f"norm must be 'none' or 'input', not {norm!r}")
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        if init not in ("identity", "uniform"):
            raise ValueError(f"init must be 'identity' or 'uniform', not {init!r}")
        self.heads = heads
        # X-Pool's layer_norm1, shared by both inputs: keeps the attention logits at the scale of the projections,
        # whatever the norms of the features that come in (None: the inputs enter as they are)
        self.ln0 = nn.LayerNorm(dim) if norm == "input" else None
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.ln1 = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(dim)
        # Identity projections, zero biases (X-Pool's initialisation): before training, v is an attention
        # over CLIP's own frame embeddings, so the coarse score starts near CLIP's, not from noise.
        for layer in (self.q, self.k, self.v, self.out, self.linear):
            nn.init.eye_(layer.weight)
            nn.init.zeros_(layer.bias)
        if init == "uniform":  # a zero query: every frame gets the same weight, so v starts as the frames' mean
            nn.init.zeros_(self.q.weight)

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1))  # (..., D) -> (..., H, D/H)

    def video_side(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """What S4 needs of each video, whatever the text: keys (Nv, F, H, d) and values already through the
        output projection (Nv, F, H, D). The output projection is linear, so it is applied to each video's
        frames before pairing: per pair only a weighted sum over frames remains (H*F*D instead of D*D
        multiply-adds). A search index stores these once per video."""
        f = self.ln0(f) if self.ln0 is not None else f
        keys = self._split(self.k(f))  # (Nv, F, H, d)
        values = self._split(self.v(f))  # (Nv, F, H, d)
        w_out = self.out.weight.T.unflatten(0, (self.heads, -1))  # (H, d, D)
        return keys, torch.einsum("vfhd,hdo->vfho", values, w_out)  # (Nv, F, H, d), (Nv, F, H, D)

    def attention(self, t: Tensor, keys: Tensor, mask: Tensor, aligned: bool = False) -> Tensor:
        """Attention of each text over each video's frames: (Nt, Nv, H, F), or (N, H, F) if aligned."""
        t = self.ln0(t) if self.ln0 is not None else t
        q = self._split(self.q(t))  # (Nt, H, d)
        logits = torch.einsum("nhd,nfhd->nhf" if aligned else "thd,vfhd->tvhf", q, keys) / math.sqrt(q.shape[-1])
        frame_mask = mask[:, None, :] if aligned else mask[None, :, None, :]
        return masked_softmax(logits, frame_mask)

    def pool(self, t: Tensor, keys: Tensor, values: Tensor, mask: Tensor, aligned: bool = False,
             attn: Tensor | None = None) -> Tensor:
        """v for every (text, video) pair, (Nt, Nv, D), or (N, D) if aligned, from video_side's keys and
        values; attn: this very attention when the caller has it already."""
        attn = self.attention(t, keys, mask, aligned) if attn is None else attn  # (Nt, Nv, H, F) or (N, H, F)
        z = torch.einsum("nhf,nfho->no" if aligned else "tvhf,vfho->tvo", attn, values) + self.out.bias
        z = self.ln1(z)  # (Nt, Nv, D)
        return self.ln2(z + self.drop(self.linear(z)))  # (Nt, Nv, D) or (N, D)

    def forward(self, t: Tensor, f: Tensor, mask: Tensor, aligned: bool = False) -> Tensor:
        return self.pool(t, *self.video_side(f), mask, aligned)

    # ---- ranking many texts against many videos (inference only) ----------------------------------------
    def factorise(self, values: Tensor) -> dict[str, Tensor]:
        """What cosine_factorised needs of each video, from video_side's values (Nv, F, H, D).

        Per pair, S4's pooled vector before LN1 is y = a^T V + b_out: the video's F*H value rows weighted by
        the attention a (the output bias is one more row, of weight 1; K = F*H + 1 rows). With Vc those rows
        centred over D (so y - mean(y) = a^T Vc) and s1 = sqrt(a^T (Vc Vc^T / D) a + eps) LN1's scale,
        z + Linear(z) = x^T Q for x = [a / s1, 1] and Q = [Vc diag(g1) (I + W^T); b1 (I + W^T) + b_lin]
        ((K+1) x D, one matrix per video). LN2 then needs only the centred Qc = Q - mean_D(Q), and the cosine
        of its output with a unit text vector t is a ratio of small forms in x:
            t . LN2 = (x^T Qc (g2 * t)) / s2 + t . b2,   s2^2 = x^T (Qc Qc^T / D) x + eps
            |LN2|^2 = x^T (Qg Qg^T) x / s2^2 + 2 x^T Qg b2 / s2 + |b2|^2,   Qg = Qc diag(g2)
        So the D x D linear and the two LayerNorms cost K x D x D once per video; per pair remain K x D (the
        product with t) and a few K x K forms, and no (texts, videos, D) tensor is built. Inference only
        (no dropout); equal to cosine(t, pool(...)) up to rounding (tested)."""
        nv, _, _, d = values.shape
        rows = torch.cat([values.flatten(1, 2), self.out.bias.expand(nv, 1, d)], 1)  # (Nv, K, D), F-major
        rows = rows - rows.mean(-1, keepdim=True)
        eye = torch.eye(d, dtype=rows.dtype, device=rows.device)
        residual = eye + self.linear.weight.T  # (D, D)
        shift = (self.ln1.bias @ residual + self.linear.bias).expand(nv, 1, d)  # (Nv, 1, D)
        q = torch.cat([(rows * self.ln1.weight) @ residual, shift], 1)  # (Nv, K+1, D)
        q = q - q.mean(-1, keepdim=True)  # LN2 sees only the centred part
        qg = q * self.ln2.weight  # (Nv, K+1, D)
        return {"basis": qg,  # (Nv, K+1, D)
                "gram": rows @ rows.transpose(1, 2) / d,  # (Nv, K, K): LN1's variance
                "forms": torch.cat([q @ q.transpose(1, 2) / d, qg @ qg.transpose(1, 2)], 2),  # (Nv, K+1, 2(K+1))
                "shift": qg @ self.ln2.bias}  # (Nv, K+1)

    def cosine_factorised(self, t: Tensor, attn: Tensor, factors: dict[str, Tensor],
                          aligned: bool = False) -> Tensor:
        """cos(t, pool(...)) from factorise()'s tensors: t (Nt, D) unit vectors, attn (Nt, Nv, H, F) -> (Nt, Nv),
        or t (N, D), attn (N, H, F) -> (N,) if aligned."""
        basis, gram, forms, shift = factors["basis"], factors["gram"], factors["forms"], factors["shift"]
        a = attn.transpose(-1, -2).flatten(-2)  # (..., F*H), F-major as the basis rows
        a = torch.cat([a, torch.ones_like(a[..., :1])], -1)  # (..., K)
        # laid out (rows, pairs per row, K): aligned pairs as (N, 1, K); all pairs video-major as (Nv, Nt, K), so
        # every product below is a matmul batched over the first dimension
        a = a.unsqueeze(1) if aligned else a.transpose(0, 1)
        s1 = torch.sqrt((torch.matmul(a, gram) * a).sum(-1).clamp(min=0) + self.ln1.eps)  # (rows, pairs)
        x = torch.cat([a / s1.unsqueeze(-1), torch.ones_like(a[..., :1])], -1)  # (rows, pairs, K+1)
        var2, sq = (torch.matmul(x, forms) * torch.cat([x, x], -1)).unflatten(-1, (2, -1)).sum(-1).unbind(-1)
        s2 = torch.sqrt(var2.clamp(min=0) + self.ln2.eps)  # a variance near 0 may round below it
        t_rows = t.unsqueeze(-1) if aligned else t.T  # (N, D, 1) or (D, Nt)
        dot = (torch.matmul(basis, t_rows).transpose(1, 2) * x).sum(-1)  # (rows, pairs)
        tb = (t @ self.ln2.bias).unsqueeze(1) if aligned else (t @ self.ln2.bias)[None]  # (N, 1) or (1, Nt)
        norm_sq = sq / s2 ** 2 + 2 * (x * shift[:, None]).sum(-1) / s2 + self.ln2.bias.square().sum()
        cos = (dot / s2 + tb) / torch.sqrt(norm_sq.clamp(min=0)).clamp(min=1e-12)  # F.normalize's floor
        return cos[:, 0] if aligned else cos.T  # (N,) or (Nt, Nv)
