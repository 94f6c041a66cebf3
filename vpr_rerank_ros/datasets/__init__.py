"""Where images and their positions come from: geotagged photos (EXIF GPS or a CSV), Mapillary SLS in its
own layout, and the seeded synthetic town that writes the MSLS layout and drive bags.

    from vpr_rerank_ros.datasets import from_folder, load_city
    images = from_folder("photos/")                     # an ImageSet for `vpr-map build`
    query, database = load_city("msls_root", "cph")      # one MSLS city's two sides

An `ImageSet` (table + image paths) is what map building takes; an `MslsSide` is what evaluation and
training take.
"""
from .geotagged import ImageSet, from_csv, from_folder, from_msls, list_images, read_exif_gps
from .msls import MslsError, MslsSide, load_city, load_side, read_predictions, resolve_cities, write_predictions
from .synth_town import BagConfig, SynthConfig, generate, write_bag

__all__ = ["BagConfig", "ImageSet", "MslsError", "MslsSide", "SynthConfig", "from_csv", "from_folder", "from_msls",
           "generate", "list_images", "load_city", "load_side", "read_exif_gps", "read_predictions",
           "resolve_cities", "write_bag", "write_predictions"]
