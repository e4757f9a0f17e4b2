"""RetrievalHead: scores (text, video) pairs from cached CLIP features (METHOD.md S2-S5 and its baselines).

Read top to bottom: encode_video (S2), encode_text (S3), score (S4 coarse + S5 fine), forward (InfoNCE).
All inputs are CLIP features before the output projection; padding (mask False) is ignored everywhere.
"""
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import HeadConfig
from .layers import (FrameWeights, KeywordAttention, LocalEnhancer, Projections, TemporalEncoder,
                     TextConditionedPool, masked_mean, masked_softmax, normalised_frame_weights)
from .loss import symmetric_infonce

TEXT_KEYS = ("text_global", "tokens", "token_mask", "keywords", "keyword_mask")
VIDEO_KEYS = ("frames", "frame_mask")
PAD_COS = -4.0  # added to the word x frame cosine of padding: below any cosine of real features (>= -1)


class _Rows:
    """Row selection for a dataclass of tensors that share their first dimension."""

    def index(self, idx):
        return type(self)(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                             for f in fields(self)})

    def __len__(self):
        return len(self.mask)


@dataclass
class VideoFeatures(_Rows):
    f0: Tensor  # (Nv, F, D) projected frames
    f: Tensor  # (Nv, F, D) temporal frame features
    v_bar: Tensor  # (Nv, D) masked mean of the L2-normalised f (CLIP4Clip's pooling, before its final norm); with
    # temporal_grad "separate", of the coarse term's own temporal features (v_bar only feeds the coarse term)
    h: Tensor  # (Nv, F, D) enhanced local features
    beta: Tensor  # (Nv, F) adaptive frame weights normalised over real frames (uniform without S2), 0 on padding
    mask: Tensor  # (Nv, F) True = real frame
    pool_keys: Optional[Tensor] = None  # (Nv, F, H, d) S4's attention keys (TextConditionedPool.video_side); None without S4
    pool_values: Optional[Tensor] = None  # (Nv, F, H, D) S4's values through its output projection
    # for_ranking() replaces pool_values by TextConditionedPool.factorise's tensors (inference only), K = F*H+1:
    pool_basis: Optional[Tensor] = None  # (Nv, K+1, D)
    pool_gram: Optional[Tensor] = None  # (Nv, K, K)
    pool_forms: Optional[Tensor] = None  # (Nv, K+1, 2(K+1))
    pool_shift: Optional[Tensor] = None  # (Nv, K+1)


@dataclass
class TextFeatures(_Rows):
    t: Tensor  # (Nt, D) projected global (EOT) feature
    w: Tensor  # (Nt, N, D) projected word tokens
    w_e: Tensor  # (Nt, N, D) keyword-enhanced word tokens
    alpha: Tensor  # (Nt, N) word weights, sum to 1 over real tokens
    mask: Tensor  # (Nt, N) True = real token


def check_mask(mask: Tensor, what: str) -> None:
    """A mask must be a non-empty prefix per row (True then False): the LSTM, the attention masks and the
    padding rules all assume it, and an empty row is an all -inf softmax (NaN). One host sync per call."""
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"{what} must be a (rows, positions) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    bad = (~mask[:, 0]) | (mask[:, 1:] & ~mask[:, :-1]).any(1)  # (rows,) empty, or True after a False
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(f"{what} row {row} is {'empty' if not mask[row].any() else 'not a prefix'}: "
                         f"{mask[row].int().tolist()}; padding must come after every real position")


class RetrievalHead(nn.Module):

    def __init__(self, cfg: HeadConfig, image_proj: Tensor, text_proj: Tensor,
                 clip_blocks: Optional[dict[str, Tensor]] = None):
        """clip_blocks: CLIP's text-transformer blocks and positional embedding (open_clip names, see
        TemporalEncoder.load_clip_blocks) to start the temporal encoder from, as CLIP4Clip does."""
        super().__init__()
        self.cfg = cfg
        self.proj = Projections(image_proj, text_proj, trainable=cfg.unfreeze_proj)
        dim = image_proj.shape[1]
        # a switched-off module is never built, so ablations differ in parameters, not just in behaviour;
        # the S2/S3 enhancements and the word weights only feed the fine term
        self.temporal = (TemporalEncoder(dim, cfg.temporal_layers, cfg.temporal_heads, cfg.max_positions,
                                         cfg.dropout, cfg.temporal_activation) if cfg.temporal else None)
        # temporal_grad "separate": the coarse term's own temporal encoder (only with both terms)
        self.temporal_coarse = (TemporalEncoder(dim, cfg.temporal_layers, cfg.temporal_heads, cfg.max_positions,
                                                cfg.dropout, cfg.temporal_activation)
                                if cfg.temporal and cfg.temporal_grad == "separate" and cfg.fine and cfg.coarse
                                else None)
        for encoder in (self.temporal, self.temporal_coarse):
            if encoder is not None and clip_blocks is not None:
                encoder.load_clip_blocks(clip_blocks)
        enhance_video = cfg.fine and cfg.video_enhance
        self.local = LocalEnhancer(dim) if enhance_video else None
        self.frame_weights = (FrameWeights(dim, cfg.temporal_heads, cfg.frame_weights == "residual",
                                           cfg.frame_norm == "input")
                              if enhance_video else None)
        self.keyword_attn = (KeywordAttention(dim, cfg.cross_heads, cfg.dropout)
                             if cfg.fine and cfg.text_enhance else None)
        # DRL's learned word-importance score; no bias: a softmax ignores a shared shift
        self.word_weights = nn.Linear(dim, 1, bias=False) if cfg.fine else None
        self.pool = (TextConditionedPool(dim, cfg.cross_heads, cfg.dropout, cfg.pool_init, cfg.pool_norm)
                     if cfg.coarse and cfg.interaction else None)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        # temperature "per-term": the coarse term's own tau (logit_scale is then the fine term's)
        self.logit_scale_coarse = (nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
                                   if cfg.temperature == "per-term" and cfg.fine and cfg.coarse else None)
        # logits of the (coarse, fine) weights with fusion "weighted"; equal logits = the mean of the two
        self.fusion_logits = (nn.Parameter(torch.zeros(2)) if cfg.fusion == "weighted" and cfg.fine and cfg.coarse
                              else None)

    # ---- S2: video ---------------------------------------------------------------------------------
    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        check_mask(frame_mask, "frame_mask")
        f0 = self.proj.project_image(frames)  # (Nv, F, D)
        f = self.temporal(f0, frame_mask) if self.temporal is not None else f0  # (Nv, F, D)
        # CLIP4Clip's pooling (_loose_similarity): normalise each frame, then average (normalised again in
        # _coarse); unnormalised frames would let a few long feature vectors outvote the others
        v_bar = masked_mean(F.normalize(f, dim=-1), frame_mask)  # (Nv, D)
        f_coarse = self.temporal_coarse(f0, frame_mask) if self.temporal_coarse is not None else f
        v_bar_coarse = masked_mean(F.normalize(f_coarse, dim=-1), frame_mask) if f_coarse is not f else v_bar
        if self.local is not None:
            h = self.local(f, v_bar)  # (Nv, F, D)
            # the weights act as frame weights of the fine match; scaling h by them would not change a cosine
            beta = normalised_frame_weights(self.frame_weights(h, frame_mask), frame_mask)  # (Nv, F)
        else:
            h, beta = f, frame_mask / frame_mask.sum(1, keepdim=True).clamp(min=1)  # (Nv, F, D), (Nv, F)
        keys, values = self.pool.video_side(self._coarse_input(f_coarse)) if self.pool is not None else (None, None)
        return VideoFeatures(f0=f0, f=f, v_bar=v_bar_coarse, h=h, beta=beta.to(f.dtype), mask=frame_mask,
                             pool_keys=keys, pool_values=values)

    def for_ranking(self, video: VideoFeatures) -> VideoFeatures:
        """The same videos, laid out to be scored against many texts (evaluation, not training): S4's
        values are factorised (TextConditionedPool.factorise), so its D x D residual linear is paid once per
        video instead of once per (text, video) pair. Scores equal score()'s up to rounding; worth it when
        each video meets more texts than ~F*H (96 at 12 frames and 8 heads)."""
        if self.pool is None or video.pool_values is None or self.training:
            return video
        factors = {f"pool_{k}": v for k, v in self.pool.factorise(video.pool_values).items()}
        return VideoFeatures(**{**vars(video), "pool_values": None, **factors})

    def _coarse_input(self, x: Tensor) -> Tensor:
        """The temporal features as the coarse term sees them: through a stop-gradient with temporal_grad
        "fine" (the forward, and so inference, is the same either way)."""
        return x.detach() if self.cfg.temporal_grad == "fine" and self.cfg.fine else x

    # ---- S3: text ----------------------------------------------------------------------------------
    def encode_text(self, text_global: Tensor, tokens: Tensor, token_mask: Tensor,
                    keywords: Tensor, keyword_mask: Tensor) -> TextFeatures:
        check_mask(token_mask, "token_mask")
        t = self.proj.project_text(text_global)  # (Nt, D)
        w = self.proj.project_text(tokens)  # (Nt, N, D)
        if self.keyword_attn is not None:
            k = self.proj.project_text(keywords)  # (Nt, K, D)
            w_e = self.keyword_attn(w, k, keyword_mask)  # (Nt, N, D)
        else:
            w_e = w
        if self.word_weights is not None:
            alpha = masked_softmax(self.word_weights(w_e).squeeze(-1), token_mask)  # (Nt, N)
        else:
            alpha = token_mask / token_mask.sum(1, keepdim=True)  # (Nt, N)
        return TextFeatures(t=t, w=w, w_e=w_e, alpha=alpha, mask=token_mask)

    # ---- S4 + S5: similarity -------------------------------------------------------------------------
    def score(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """All-pairs similarity (Nt, Nv) = fine + coarse."""
        return self._score(text, video, aligned=False)

    def score_pairs(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """Similarity of text i with video i, (N,); the diagonal of score() at O(N) cost."""
        if len(text) != len(video):
            raise ValueError(f"score_pairs needs as many texts as videos, got {len(text)} and {len(video)}")
        return self._score(text, video, aligned=True)

    def _score(self, text: TextFeatures, video: VideoFeatures, aligned: bool) -> Tensor:
        return self._fuse(*self._terms(text, video, aligned))

    def _terms(self, text: TextFeatures, video: VideoFeatures, aligned: bool):
        """(coarse, fine) scores; None for a term that is switched off."""
        coarse = self._coarse(text, video, aligned) if self.cfg.coarse else None
        fine = self._fine(text, video, aligned) if self.cfg.fine else None
        return coarse, fine

    def _fuse(self, coarse: Optional[Tensor], fine: Optional[Tensor]) -> Tensor:
        if coarse is None or fine is None:
            return coarse if fine is None else fine
        if self.cfg.fusion == "sum":
            return coarse + fine
        if self.cfg.fusion == "mean":
            return (coarse + fine) / 2
        w = self.fusion_logits.softmax(0)
        return w[0] * coarse + w[1] * fine

    def _coarse(self, text: TextFeatures, video: VideoFeatures, aligned: bool, attn: Optional[Tensor] = None) -> Tensor:
        """cos(t, v); attn: S4's attention for these pairs when the caller has computed it already."""
        t = F.normalize(text.t, dim=-1)  # (Nt, D)
        if self.pool is None:
            v = F.normalize(self._coarse_input(video.v_bar), dim=-1)  # (Nv, D)
            return (t * v).sum(-1) if aligned else t @ v.T  # (N,) or (Nt, Nv)
        if video.pool_basis is not None:  # for_ranking's layout: the cosine straight from the factors
            attn = self.pool.attention(text.t, video.pool_keys, video.mask, aligned) if attn is None else attn
            factors = {k: getattr(video, f"pool_{k}") for k in ("basis", "gram", "forms", "shift")}
            return self.pool.cosine_factorised(t, attn, factors, aligned)
        v = self.pool.pool(text.t, video.pool_keys, video.pool_values, video.mask, aligned, attn)
        v = F.normalize(v, dim=-1)  # (N, D) or (Nt, Nv, D)
        return (t * v).sum(-1) if aligned else torch.einsum("td,tvd->tv", t, v)

    def _word_frame_cos(self, text: TextFeatures, video: VideoFeatures, aligned: bool):
        """Cosines c (Nt, Nv, N, F) of every word with every frame (PAD_COS lower where either is padding),
        and the frame mask and weights laid out to broadcast against it. Aligned pairs are laid out as an
        (N, 1) grid so one code path serves both."""
        w = F.normalize(text.w_e, dim=-1)  # (Nt, N, D)
        h = F.normalize(video.h, dim=-1)  # (Nv, F, D)
        # Two more coordinates, [pad_w, 1] on the words and [1, pad_f] on the frames, add PAD_COS to every
        # cosine of a padded word or frame and 0 to the others: the maxima below then never pick padding,
        # without a masked copy of the largest tensor of the head (a third of the fine term's time on a CPU)
        w = torch.cat([w, torch.where(text.mask, 0.0, PAD_COS).to(w.dtype).unsqueeze(-1),
                       torch.ones_like(w[..., :1])], -1)  # (Nt, N, D+2)
        h = torch.cat([h, torch.ones_like(h[..., :1]),
                       torch.where(video.mask, 0.0, PAD_COS).to(h.dtype).unsqueeze(-1)], -1)  # (Nv, F, D+2)
        if aligned:
            c = torch.einsum("twd,tfd->twf", w, h).unsqueeze(1)  # (N, 1, N_w, F)
            return c, video.mask.unsqueeze(1), video.beta.unsqueeze(1)  # (N, 1, F)
        c = torch.einsum("twd,vfd->tvwf", w, h)  # (Nt, Nv, N, F)
        return c, video.mask.unsqueeze(0), video.beta.unsqueeze(0)  # (1, Nv, F)

    def _fine(self, text: TextFeatures, video: VideoFeatures, aligned: bool, best_word_out: Optional[list] = None) -> Tensor:
        """DRL's weighted token interaction with the patent's frame weights. best_word_out: a list that
        receives each frame's best-word cosine (Nt, Nv, F), for explain, when not aligned."""
        c, frame_mask, beta = self._word_frame_cos(text, video, aligned)  # (Nt, Nv, N, F), (., ., F), (., ., F)
        word_mask = text.mask.unsqueeze(1)  # (Nt, 1, N)
        best_frame = c.amax(-1)  # (Nt, Nv, N): padded frames are below every real one (_word_frame_cos)
        best_word = c.amax(-2)  # (Nt, Nv, F): padded words likewise; padded rows are dropped below
        if best_word_out is not None:
            best_word_out.append(best_word)
        t2v = torch.where(word_mask, best_frame * text.alpha.unsqueeze(1), 0).sum(-1)  # (Nt, Nv)
        v2t = torch.where(frame_mask, best_word * beta, 0).sum(-1)  # (Nt, Nv)
        s = (t2v + v2t) / 2
        return s.squeeze(1) if aligned else s

    def score_explained(self, text: TextFeatures, video: VideoFeatures) -> tuple[Tensor, Tensor]:
        """score() and explain() at once, (Nt, Nv) and (Nt, Nv, F): S4's attention and the word x frame
        cosines are computed once for both (search shows each hit's best second)."""
        attn = self.pool.attention(text.t, video.pool_keys, video.mask) if self.pool is not None else None
        coarse = self._coarse(text, video, False, attn) if self.cfg.coarse else None
        best_word: list = []
        fine = self._fine(text, video, False, best_word) if self.cfg.fine else None
        return self._fuse(coarse, fine), self._relevance(text, video, attn, best_word[0] if best_word else None)

    def explain(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """Per-frame relevance (Nt, Nv, F), 0 on padding; compare frames within one pair, not across pairs.

        The sum of the S4 attention over frames (mean over heads) and each frame's best-word cosine of the
        fine match; a head with neither term uses cos(t, f_i).
        """
        attn = self.pool.attention(text.t, video.pool_keys, video.mask) if self.pool is not None else None
        best_word = None
        if self.cfg.fine:
            c, _, _ = self._word_frame_cos(text, video, aligned=False)  # (Nt, Nv, N, F)
            best_word = c.amax(2)  # (Nt, Nv, F): padded words are below every real one
        return self._relevance(text, video, attn, best_word)

    def _relevance(self, text: TextFeatures, video: VideoFeatures, attn: Optional[Tensor],
                   best_word: Optional[Tensor]) -> Tensor:
        relevance = 0
        if attn is not None:
            relevance = relevance + attn.mean(2)  # (Nt, Nv, F)
        if best_word is not None:
            relevance = relevance + best_word  # (Nt, Nv, F)
        if not torch.is_tensor(relevance):
            t, f = F.normalize(text.t, dim=-1), F.normalize(video.f, dim=-1)  # (Nt, D), (Nv, F, D)
            relevance = torch.einsum("td,vfd->tvf", t, f)  # (Nt, Nv, F)
        return torch.where(video.mask.unsqueeze(0), relevance, 0)

    # ---- training ------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[Tensor, dict]:
        """Symmetric InfoNCE over the B x B score matrix of a batch where text i matches video i."""
        text = self.encode_text(*(batch[k] for k in TEXT_KEYS))
        video = self.encode_video(*(batch[k] for k in VIDEO_KEYS))
        coarse, fine = self._terms(text, video, aligned=False)  # (B, B) each, or None
        s = self._fuse(coarse, fine)  # (B, B)
        # tau is kept <= its maximum in place after each optimiser step (clamp_logit_scale_, as open_clip
        # does): a clamp here would zero tau's gradient at the limit, where it starts
        scale = self.logit_scale.exp()
        both = coarse is not None and fine is not None
        if self.cfg.loss_terms == "parts" and both:  # an ensemble: each term learns to rank on its own
            own = self.logit_scale_coarse is not None  # temperature "per-term"
            scale_c = self.logit_scale_coarse.exp() if own else scale
            terms = [symmetric_infonce(coarse * scale_c), symmetric_infonce(fine * scale)]
            loss = (terms[0] + terms[1]) / 2
            return loss, {"loss": loss.detach(), "logit_scale": scale.detach(),
                          **({"logit_scale_coarse": scale_c.detach()} if own else {}),
                          "pos_score": s.diagonal().mean().detach(), "terms": terms, "term_names": ("coarse", "fine")}
        loss = symmetric_infonce(s * scale)
        if self.cfg.loss_terms == "each" and both:
            # deep supervision: each term must rank on its own too, so the one that fits the training set
            # first (fine) does not leave the other without gradient once the fused loss is near zero
            terms = [loss, symmetric_infonce(coarse * scale), symmetric_infonce(fine * scale)]
            loss = (terms[0] + terms[1] + terms[2]) / 3
            return loss, {"loss": loss.detach(), "logit_scale": scale.detach(),
                          "pos_score": s.diagonal().mean().detach(), "terms": terms,
                          "term_names": ("fused", "coarse", "fine")}
        return loss, {"loss": loss.detach(), "logit_scale": scale.detach(), "pos_score": s.diagonal().mean().detach()}

    @torch.no_grad()
    def clamp_logit_scale_(self):
        """Keep tau <= its maximum; the trainer calls this after every optimiser step."""
        self.logit_scale.clamp_(max=self.cfg.logit_scale_max)
        if self.logit_scale_coarse is not None:
            self.logit_scale_coarse.clamp_(max=self.cfg.logit_scale_max)
