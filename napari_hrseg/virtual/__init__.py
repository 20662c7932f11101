"""A procedural, lazily rendered gigapixel H&E slide with exact ground truth.

>>> from napari_hrseg.virtual import virtual_slide
>>> vs = virtual_slide(seed=0)                      # 100,000 x 100,000 px, 9 levels; nothing rendered yet
>>> tile = vs.slide.read(Region(0, 0, 512, 512))    # renders one chunk
>>> truth = vs.semantic[0][:512, :512].compute()    # class per pixel (see vs.class_names)

What it shows: colorectal mucosa at 20x (0.5 µm/px) on glass: crypts with goblet cells and basal nuclei in a
lamina propria with lymphocytes and collagen, lymphoid aggregates, and an adenocarcinoma focus a few millimetres
across whose glands are larger, irregular, crowded and fused, with stratified atypical nuclei, in pale
desmoplastic stroma.  Classes (`CLASS_NAMES`): background (glass), stroma, normal epithelium, lumen, tumour
epithelium.  Tumour epithelium needs context to be told from normal epithelium (see `params`), and its borders
need full resolution: the case multi-scale segmentation is for.

Modules, one job each: `hashing` (counter-based randomness), `noise` (band-limited fields sampled as pixels see
them), `params` (the biology in micrometres), `layout` (tissue, tumour, glands), `epithelium` (crypt nuclei and
goblet cells, per gland), `nuclei` (stromal nuclei on grids), `stain` (Beer-Lambert palettes), `render` (one
chunk at any level), `pyramid` (lazy dask levels), `virtual_slide` (the public factory).
"""

from .params import CLASS_COLORS, CLASS_NAMES
from .render import RENDER_COUNTS
from .stain import STAIN_PALETTES, StainPalette
from .virtual_slide import VirtualSlide, virtual_slide

__all__ = [
    "VirtualSlide", "virtual_slide", "STAIN_PALETTES", "StainPalette", "CLASS_NAMES", "CLASS_COLORS", "RENDER_COUNTS",
]
