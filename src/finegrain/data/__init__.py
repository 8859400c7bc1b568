from finegrain.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, load_image
from finegrain.data.folders import ImageSet, Sample, load_image_set, read_manifest, scan_folder
from finegrain.data.splits import stratified_split

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageSet",
    "Sample",
    "load_image",
    "load_image_set",
    "read_manifest",
    "scan_folder",
    "stratified_split",
]
