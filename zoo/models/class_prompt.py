"""ClassPromptSAM: a TinyViT encoder, SAM's prompt encoder and mask decoder, and optionally the class-prompt
parts of the class-prompt TinyViT paper: a modality head on the image embedding and a learned per-modality
vector added to the box's prompt tokens.

With `class_prompt=False` it is exactly LiteMedSAM; with a zero class-prompt table it still gives LiteMedSAM's
masks, so fine-tuning starts from LiteMedSAM's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from zoo.data.preprocess import IMAGE_SIZE
from zoo.modalities import MODALITIES
from zoo.models.clicks import pad_clicks
from zoo.models.encoders import ENCODER_CONFIGS, TinyViTConfig, TinyViTEncoder
from zoo.models.pooled_decoder import PooledMaskDecoder, PooledTwoWayTransformer
from zoo.models.weights import module_fingerprint

EMBED_DIM = 256


# zoo.models.pooled_decoder's design: only the prompt tokens' attention to the image on pooled tokens.
LIGHT_DECODER = "pooled-tokens"


@dataclass
class ModelConfig:
    """What a checkpoint needs to rebuild its model: the encoder's shape, whether it has a class prompt, and the
    mask decoder's token stride (1: SAM's decoder; 2 or more: zoo.models.pooled_decoder's light decoder, SAM's with the
    prompt tokens' attention to the image on a pooled grid)."""

    encoder: TinyViTConfig = field(default_factory=lambda: ENCODER_CONFIGS["litemedsam"])
    class_prompt: bool = False
    decoder_token_stride: int = 1
    # A mask decoder of its own for decodes with clicks (issue #31), of the box decoder's design: a box alone keeps
    # the box decoder, so box-only masks stay exactly those of the model it was trained from.
    click_decoder: bool = False
    # Whether a click stage (distill.finetune --clicks) trained it: until then clicks run a decoder trained on boxes
    # alone, which they can make worse (zoo.segment and the app say so).
    clicks_trained: bool = False

    @property
    def decoder(self) -> str:
        """The decoder's design, named in checkpoints: 'sam', or LIGHT_DECODER for a stride of 2 or more."""
        return "sam" if self.decoder_token_stride == 1 else LIGHT_DECODER

    def to_dict(self) -> dict:
        values = {"encoder": self.encoder.to_dict(), "class_prompt": self.class_prompt,
                  "decoder_token_stride": self.decoder_token_stride, "decoder": self.decoder}
        if self.click_decoder:  # written only when there is one: earlier readers still read the others
            values["click_decoder"] = True
        if self.clicks_trained:
            values["clicks_trained"] = True
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """Checkpoints written before the light decoder existed have SAM's decoder. A stride without this light
        decoder's name was written by an earlier design (both attentions pooled), whose masks this one does not
        reproduce: refused, not loaded into the wrong decoder."""
        stride = int(values.get("decoder_token_stride", 1))
        config = cls(encoder=TinyViTConfig.from_dict(values["encoder"]), class_prompt=bool(values["class_prompt"]),
                     decoder_token_stride=stride, click_decoder=bool(values.get("click_decoder", False)),
                     clicks_trained=bool(values.get("clicks_trained", False)))
        decoder = values.get("decoder", "sam" if stride == 1 else "an earlier light decoder")
        if decoder != config.decoder:
            raise ValueError(f"decoder {decoder!r} with decoder_token_stride {stride}: this version builds SAM's decoder"
                             f" (stride 1) or {LIGHT_DECODER!r} (stride 2 or more)")
        return config


class ModalityHead(nn.Module):
    """Globally averaged image embedding -> modality logits: (B, 256, 64, 64) -> (B, 11).
    Linear 256→256, ReLU, Linear 256→256, ReLU, Linear 256→11."""

    def __init__(self, dim: int = EMBED_DIM, num_classes: int = len(MODALITIES)):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_classes),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.mlp(embedding.mean(dim=(2, 3)))


class ClassPromptSAM(nn.Module):
    """Box-prompted segmentation with an optional class prompt.

    The interface every model variant answers (see zoo.runtime.interface):
      embed(image)                      (1, 3, 256, 256) -> (1, 256, 64, 64)
      encoder_fingerprint()             a hash that is equal exactly when embed() gives equal outputs
      predict_modality(embedding)       (1, 256, 64, 64) -> (1, 11) logits, or None without a head
      decode(embedding, boxes, modality, points=None, point_labels=None, mask_input=None)
                                        boxes (N, 4) at 256 scale -> (N, 1, 256, 256) mask logits
      decode_clicks(embedding, boxes, modality, points, point_labels, mask_input, has_mask_input)
                                        the click decode on padded inputs (the exported `clicks` graph)
    """

    backend = "pytorch"
    takes_clicks = True  # decode(points=, point_labels=, mask_input=): zoo.models.clicks

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.image_encoder = TinyViTEncoder(config.encoder)
        grid = config.encoder.embedding_size
        self.prompt_encoder = PromptEncoder(
            embed_dim=EMBED_DIM, image_embedding_size=(grid, grid), input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        )
        shape = dict(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8)
        decoder = dict(num_multimask_outputs=3, transformer_dim=EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256)
        stride = config.decoder_token_stride

        def mask_decoder():
            if stride == 1:
                return MaskDecoder(transformer=TwoWayTransformer(**shape), **decoder)
            return PooledMaskDecoder(transformer=PooledTwoWayTransformer(token_stride=stride, **shape), **decoder)

        self.mask_decoder = mask_decoder()
        self.click_mask_decoder = mask_decoder() if config.click_decoder else None
        if config.class_prompt:
            self.modality_head = ModalityHead()
            self.class_prompt = nn.Embedding(len(MODALITIES), EMBED_DIM)
            nn.init.zeros_(self.class_prompt.weight)  # starts as LiteMedSAM
        else:
            self.modality_head = None
            self.class_prompt = None

    @property
    def precision(self) -> str:
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[next(self.parameters()).dtype]

    @property
    def has_modality_head(self) -> bool:
        return self.modality_head is not None

    @property
    def clicks_trained(self) -> bool:
        return self.config.clicks_trained

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)

    def encoder_fingerprint(self) -> str:
        return module_fingerprint(self.image_encoder)

    def predict_modality(self, embedding: torch.Tensor) -> torch.Tensor | None:
        return None if self.modality_head is None else self.modality_head(embedding)

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor, modality: torch.Tensor | int | None = None,
               points: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
               mask_input: torch.Tensor | None = None) -> torch.Tensor:
        """embedding (1 or N, 256, 64, 64), boxes (N, 4), modality: id, (N,) ids or None -> logits (N, 1, 256, 256).

        Clicks: points (N, P, 2) as (x, y) at 256 scale with point_labels (N, P): 1 positive, 0 negative, -1 padding;
        mask_input (N, 1, 256, 256): the previous step's logits. With neither, the box-only decode (unchanged since
        before clicks); with either, decode_clicks on the inputs padded as every backend pads them
        (zoo.models.clicks.pad_clicks). Without a given modality a class-prompt model uses its head's prediction."""
        if self.class_prompt is not None and modality is None:
            modality = self.predict_modality(embedding).argmax(dim=1)
        if points is not None or mask_input is not None:
            clicks = pad_clicks(len(boxes.reshape(-1, 4)), points, point_labels, mask_input)
            device = boxes.device
            return self.decode_clicks(embedding, boxes, modality, *(v.to(device) for v in clicks.values()))
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes.reshape(-1, 1, 4).float(), masks=None)
        if self.class_prompt is not None:
            ids = torch.as_tensor(modality, device=sparse.device).reshape(-1)
            sparse = sparse + self.class_prompt(ids)[:, None, :]  # onto both box tokens
        logits, _ = self.mask_decoder(
            image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        return logits

    def click_prompts(self, boxes: torch.Tensor, points: torch.Tensor, point_labels: torch.Tensor,
                      mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's prompt encoder on padded clicks (zoo.models.clicks.pad_clicks), written with selections instead of
        in-place masked writes so that it exports to ONNX, as SAM's ONNX model does: the same sums as
        PromptEncoder.forward(points, boxes, masks) (tested). -> sparse (N, P + 2, 256): the points then the two box
        corners; dense (N, 256, 64, 64): the mask prompt where has_mask_input is 1, the no-mask embedding where 0."""
        encoder = self.prompt_encoder
        coords = encoder.pe_layer.forward_with_coords(points.float() + 0.5, encoder.input_image_size)  # (N, P, 256)
        labels = point_labels.float()[..., None]
        padding = encoder.not_a_point_embed.weight.expand_as(coords)
        points_embedded = torch.where(labels == 1, coords + encoder.point_embeddings[1].weight,
                                      torch.where(labels == 0, coords + encoder.point_embeddings[0].weight, padding))
        sparse = torch.cat([points_embedded, encoder._embed_boxes(boxes.reshape(-1, 1, 4).float())], dim=1)
        has_mask = has_mask_input.float().reshape(-1, 1, 1, 1)[:1]
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask * encoder.mask_downscaling(mask_input.float()) + (1 - has_mask) * no_mask
        return sparse, dense

    def decode_clicks(self, embedding: torch.Tensor, boxes: torch.Tensor, modality: torch.Tensor | int | None,
                      points: torch.Tensor, point_labels: torch.Tensor, mask_input: torch.Tensor,
                      has_mask_input: torch.Tensor) -> torch.Tensor:
        """The click decode on padded inputs (what the exported `clicks` graph computes): box, points and labels
        (N, MAX_POINTS[, 2]), mask_input (N, 1, 256, 256), has_mask_input (1,) -> logits (N, 1, 256, 256). The class
        prompt is part of the box prompt: it goes onto the two box tokens only. A model with a click decoder
        (config.click_decoder) decodes with it; the others with their box decoder."""
        sparse, dense = self.click_prompts(boxes, points, point_labels, mask_input, has_mask_input)
        if self.class_prompt is not None:
            ids = torch.as_tensor(modality, device=sparse.device).reshape(-1)
            sparse = torch.cat([sparse[:, :-2], sparse[:, -2:] + self.class_prompt(ids)[:, None, :]], dim=1)
        decoder = self.mask_decoder if self.click_mask_decoder is None else self.click_mask_decoder
        logits, _ = decoder(
            image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        return logits

    def forward(self, image: torch.Tensor, boxes: torch.Tensor, modality: torch.Tensor | int | None = None) -> torch.Tensor:
        """Training path: image (B, 3, 256, 256), one box per image (B, 4) -> (B, 1, 256, 256) logits."""
        embedding = self.embed(image)
        if embedding.shape[0] == 1:
            return self.decode(embedding, boxes, modality)
        # mask_decoder repeats the embedding per prompt; one box per image is decoded image by image.
        ids = [None] * len(boxes) if modality is None else torch.as_tensor(modality).reshape(-1).expand(len(boxes))
        return torch.cat([self.decode(embedding[i : i + 1], boxes[i : i + 1], ids[i]) for i in range(len(boxes))])
