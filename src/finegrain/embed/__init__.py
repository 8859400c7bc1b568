from finegrain.embed.extract import Embedder, ExtractResult, embed_images, extract_to_store
from finegrain.embed.normalize import NORMALIZERS, Normalizer, create_normalizer
from finegrain.embed.shard import extract_sharded
from finegrain.embed.store import FeatureStore
from finegrain.models.pooling import POOLINGS, GeM, create_pooling

__all__ = [
    "NORMALIZERS",
    "POOLINGS",
    "Embedder",
    "ExtractResult",
    "FeatureStore",
    "GeM",
    "Normalizer",
    "create_normalizer",
    "create_pooling",
    "embed_images",
    "extract_sharded",
    "extract_to_store",
]
