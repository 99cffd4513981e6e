"""Teacher embeddings computed once and kept on disk in float16 (zoo.runtime.embedding_cache's layout, one folder per
teacher id). An interrupted build leaves no half-written entry and simply resumes: entries already there are
skipped once their checksum is verified; a damaged one is reported, deleted and computed again."""

from __future__ import annotations

import torch
from tqdm import tqdm

from zoo.data.samples import Sample, sample_tensor
from zoo.runtime import embedding_cache as zoo_cache
from zoo.runtime.embedding_cache import image_key


class EmbeddingCache(zoo_cache.EmbeddingCache):
    """Teacher embeddings in float16, with a resumable build over training samples."""

    @torch.inference_mode()
    def build(self, samples: list[Sample], teacher, device: str = "cpu", batch_size: int = 4,
              progress: bool = True) -> list[str]:
        """Keys of every sample's image, computing the missing teacher embeddings (in batches)."""
        keys, pending = [], []

        def flush():
            if pending:
                embeddings = teacher.embed(torch.stack([image for _, image in pending]).to(device))
                for (key, _), embedding in zip(pending, embeddings):
                    self.put(key, embedding)
                pending.clear()

        bar = tqdm(samples, desc="teacher embeddings", unit="img", disable=not progress)
        for sample in bar:
            image = sample_tensor(sample)
            key = image_key(image)
            keys.append(key)
            if any(key == k for k, _ in pending) or self.get(key) is not None:
                self.hits += 1
            else:
                self.misses += 1
                pending.append((key, image))
                if len(pending) == batch_size:
                    flush()
            bar.set_postfix(cached=self.hits, computed=self.misses)
        flush()
        return keys
