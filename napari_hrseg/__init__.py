"""napari-hrseg: segment gigapixel pathology slides in napari.

The headless API (no Qt, no napari import) is re-exported here:

>>> from napari_hrseg import open_slide, Region
>>> slide = open_slide("slide.svs")          # reads metadata only
>>> tile = slide.read(Region(0, 0, 512, 512), level=0)
"""

from .errors import HrsegError
from .geometry import Region
from .slide import Slide, open_slide

__version__ = "0.1.0"

__all__ = ["HrsegError", "Region", "Slide", "open_slide", "__version__"]
