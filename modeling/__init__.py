"""EntmaxViT model family. Importing this package registers the classes with the transformers Auto API, so
``save_pretrained`` writes ``auto_map`` and copies the flat modeling files for ``trust_remote_code`` users."""

from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from .attention import (ATTENTION_INTERFACE_NAMES, ATTENTION_KERNELS, ATTENTION_TRANSFORMS, attention_function,
                        get_attention_transform, resolve_kernel)
from .configuration_entmax_vit import EntmaxViTConfig
from .image_processing_entmax_vit import IMAGENET_MEAN, IMAGENET_STD, EntmaxViTImageProcessor, make_image_processor
from .modeling_entmax_vit import (EntmaxViTBackbone, EntmaxViTForImageClassification, EntmaxViTModel,
                                  EntmaxViTPreTrainedModel)

EntmaxViTConfig.register_for_auto_class()
AutoConfig.register(EntmaxViTConfig.model_type, EntmaxViTConfig, exist_ok=True)
for cls, auto in ((EntmaxViTModel, AutoModel), (EntmaxViTForImageClassification, AutoModelForImageClassification),
                  (EntmaxViTBackbone, AutoBackbone), (EntmaxViTImageProcessor, AutoImageProcessor)):
    cls.register_for_auto_class(auto.__name__)  # auto_map in saved configs
    auto.register(EntmaxViTConfig, cls, exist_ok=True)  # in-process, without trust_remote_code

__all__ = ["ATTENTION_KERNELS", "ATTENTION_TRANSFORMS", "EntmaxViTBackbone", "EntmaxViTConfig",
           "EntmaxViTForImageClassification", "EntmaxViTImageProcessor", "EntmaxViTModel", "EntmaxViTPreTrainedModel",
           "IMAGENET_MEAN", "IMAGENET_STD", "get_attention_transform", "make_image_processor"]
