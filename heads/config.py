"""HeadConfig: the shape and switches of the retrieval head, saved beside every checkpoint."""
import math
from dataclasses import asdict, dataclass, fields

# A baseline variant is a preset of the module switches: the same model class with modules left out.
VARIANT_PRESETS = {
    "full": {},
    "meanp": dict(temporal=False, video_enhance=False, text_enhance=False, interaction=False,
                  fine=False, coarse=True),
    "seqtransf": dict(temporal=True, video_enhance=False, text_enhance=False, interaction=False,
                      fine=False, coarse=True),
}


@dataclass
class HeadConfig:
    variant: str = "full"  # "full" (S2-S5), or a baseline preset "meanp" | "seqtransf" that overrides the switches below
    temporal: bool = True  # S2 temporal transformer; off -> f = f0 (needed so that "every module off" is meanP)
    video_enhance: bool = True  # S2 LSTM local enhancement + adaptive frame weights; off -> h = f, uniform frame weights
    text_enhance: bool = True  # S3 keyword-guided word features; off -> w_e = w
    interaction: bool = True  # S4 text-conditioned pooling for the coarse term; off -> coarse uses the mean-pooled v_bar
    fine: bool = True  # S5 fine-grained (word x frame) term; the S2/S3 enhancements only feed this term
    coarse: bool = True  # S5 coarse cos(t, v) term
    fusion: str = "sum"  # how S5 joins the terms: "sum" = fine + coarse (the patent), "mean" = (fine + coarse) / 2,
    # "weighted" = w_c * coarse + w_f * fine with (w_c, w_f) a learnt softmax, starting at (1/2, 1/2)
    loss_terms: str = "parts"  # "parts": each term's own InfoNCE only (the terms are trained as two retrieval
    # models and joined only at inference, an ensemble; the default as the best full-head recipe measured, though
    # below fine only on the second held-out set: README "Training the full head"); "fused": InfoNCE on the
    # joined score (the default before); "each": the mean of the fused and of each term's own InfoNCE
    temporal_grad: str = "separate"  # how the two terms use the S2 temporal encoder: "separate" (the default):
    # nothing is shared, the coarse term has a temporal encoder of its own (from CLIP's blocks too with temporal_init
    # "clip"), so neither term's loss can pull the other's temporal features (the recipe measured above fine only
    # and every other part at 1,000 steps: README "Training the full head"); "both": one encoder trained by both
    # terms (the default before; a config saved without this field ran so); "fine": one encoder, the coarse term
    # reads it through a stop-gradient (the forward pass, and so inference, is the same as "both")
    temperature: str = "shared"  # with loss_terms "parts": "shared", one learnt tau for both terms' InfoNCE, or
    # "per-term", each term its own (then the terms share no parameter at all with temporal_grad "separate"); the
    # joined score at inference is fine + coarse either way
    pool_init: str = "identity"  # S4's attention at the start: "identity" (X-Pool's: identity query and key
    # projections, so the attention starts as CLIP's own text-frame similarity: meaningful with CLIP's weights,
    # noise with random ones); "uniform" (zero query projection: the attention starts uniform over the frames, so
    # S4 starts as mean pooling and learns where to look)
    pool_norm: str = "input"  # S4's inputs: "input" (X-Pool's layer_norm1: one LayerNorm, shared by the text
    # feature and the frames, before the query, key and value projections); "none" (they enter the attention as
    # they are, so its logits grow with their norms: the temporal encoder's output norm grows in training and the
    # attention saturates onto one frame; the default before); a config saved without it had "none"
    frame_weights: str = "patent"  # S2's adaptive frame weights: "patent", a_i = sigmoid(FC2(SelfAttn(FC1(h_i)))) as
    # written; "residual", sigmoid(FC2(x_i + SelfAttn(x)_i)) with x = FC1(h): the self-attention of an untrained head
    # gives every frame of a video the same output, so the patent's form starts (and, measured, stays) uniform
    frame_norm: str = "none"  # S2's frame weights' input: "none" (h as it comes, as the patent writes it: the logits
    # grow with the temporal features' norm and saturate, which stops their gradient) | "input" (a LayerNorm on h
    # before FC1, as pool_norm "input" does for S4); a config saved without it had "none"
    temporal_layers: int = 4  # transformer layers of the temporal encoder (CLIP4Clip seqTransf uses 4)
    temporal_heads: int = 8  # attention heads of the temporal encoder and of the frame-weight self-attention
    temporal_init: str = "clip"  # "clip": start from CLIP's first text blocks and positions (CLIP4Clip); "random"
    temporal_activation: str = "gelu"  # "gelu" | "quick_gelu" (OpenAI CLIP's blocks); set from CLIP with clip init
    cross_heads: int = 1  # heads of the S3/S4 cross attentions (patent silent; X-Pool's default is 1)
    max_frames: int = 12  # frames the data layer samples per video for training
    max_positions: int = 64  # rows of the learned position table (>= max_frames), so evaluation on longer clips fits
    dropout: float = 0.1  # dropout in the temporal encoder and the S3/S4 residual branches
    unfreeze_proj: bool = False  # train CLIP's output projections too ("partially frozen CLIP")
    logit_scale_init: float = math.log(100)  # initial tau (log of the InfoNCE inverse temperature), CLIP's value
    logit_scale_max: float = math.log(100)  # tau is clamped to this, as CLIP does

    def __post_init__(self):
        if self.variant not in VARIANT_PRESETS:
            raise ValueError(f"unknown head variant {self.variant!r}; expected one of {sorted(VARIANT_PRESETS)}")
        for name, value in VARIANT_PRESETS[self.variant].items():
            setattr(self, name, value)
        if not (self.fine or self.coarse):
            raise ValueError("at least one of fine / coarse must be on, or the head scores nothing")
        if self.fusion not in ("sum", "mean", "weighted"):
            raise ValueError(f"fusion must be 'sum', 'mean' or 'weighted', not {self.fusion!r}")
        if self.loss_terms not in ("fused", "each", "parts"):
            raise ValueError(f"loss_terms must be 'fused', 'each' or 'parts', not {self.loss_terms!r}")
        if self.loss_terms == "parts" and self.fusion == "weighted" and self.fine and self.coarse:
            raise ValueError("fusion 'weighted' learns its weights from the loss on the joined score, which loss_terms "
                             "'parts' does not compute: nothing would train them. Use loss_terms 'fused' or 'each' "
                             "with it (--loss-terms fused), or fusion 'sum'")
        if self.temporal_grad not in ("both", "fine", "separate"):
            raise ValueError(f"temporal_grad must be 'both', 'fine' or 'separate', not {self.temporal_grad!r}")
        if self.temperature not in ("shared", "per-term"):
            raise ValueError(f"temperature must be 'shared' or 'per-term', not {self.temperature!r}")
        if self.temperature == "per-term" and self.fine and self.coarse and self.loss_terms != "parts":
            raise ValueError("temperature 'per-term' gives each term's own InfoNCE its own tau, which only loss_terms "
                             "'parts' has; use --loss-terms parts with it")
        if self.pool_init not in ("identity", "uniform"):
            raise ValueError(f"pool_init must be 'identity' or 'uniform', not {self.pool_init!r}")
        if self.pool_norm not in ("none", "input"):
            raise ValueError(f"pool_norm must be 'none' or 'input', not {self.pool_norm!r}")
        if self.frame_weights not in ("patent", "residual"):
            raise ValueError(f"frame_weights must be 'patent' or 'residual', not {self.frame_weights!r}")
        if self.frame_norm not in ("none", "input"):
            raise ValueError(f"frame_norm must be 'none' or 'input', not {self.frame_norm!r}")
        if self.temporal_init not in ("clip", "random"):
            raise ValueError(f"temporal_init must be 'clip' or 'random', not {self.temporal_init!r}")
        if self.temporal_activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"temporal_activation must be 'gelu' or 'quick_gelu', not {self.temporal_activation!r}")
        if self.max_positions < self.max_frames:
            raise ValueError(f"max_positions={self.max_positions} is smaller than max_frames={self.max_frames}")
        if self.logit_scale_init > self.logit_scale_max:
            raise ValueError("logit_scale_init exceeds logit_scale_max")

    def terms_apart(self) -> bool:
        """Whether the training loss is made of several InfoNCE terms (both terms on, loss_terms not "fused"):
        TrainConfig.clip_terms clips each on its own then."""
        return self.fine and self.coarse and self.loss_terms != "fused"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:  # a typo or a config from another version must not be silently dropped
            raise ValueError(f"unknown HeadConfig fields: {sorted(unknown)}")
        # a config saved before temporal_grad existed ran with one shared temporal encoder, and one saved before
        # pool_norm existed had no LayerNorm on S4's inputs (frame_weights: named so the default can change)
        return cls(**{"temporal_grad": "both", "pool_norm": "none", "frame_weights": "patent", "frame_norm": "none", **d})
