"""Imports every built-in architecture module so that its ``@register_model`` runs."""

from . import backbones  # noqa: F401  "fpn": the single-scale baseline
from . import dupsampling  # noqa: F401  "dupsampling": DUpsampling decoder (Tian et al., CVPR 2019)
from . import hms_attention  # noqa: F401  "hmsa": hierarchical multi-scale attention (Tao et al., 2020)
from . import magnet  # noqa: F401  "magnet": MagNet progressive refinement (Huynh et al., CVPR 2021)
from . import refinemask  # noqa: F401  "refinemask": RefineMask with centre-heatmap proposals (Zhang et al., CVPR 2021)
from . import glnet  # noqa: F401  "glnet": GLNet collaborative global-local networks (Chen et al., CVPR 2019)
