"""EntmaxViT model family. Importing this package registers the classes with the transformers Auto API, so
``save_pretrained`` writes ``auto_map`` and copies the flat modeling files for ``trust_remote_code`` users."""

from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from .attention import (ATTENTION_INTERFACE_NAMES, ATTENTION_KERNELS, ATTENTION_TRANSFORMS, attention_function,
                        get_attention_transform, resolve_kernel)
from .configuration_entmax_vit import PRESET_ALIASES, PRESETS, EntmaxViTConfig
from .image_processing_entmax_vit import IMAGENET_MEAN, IMAGENET_STD, EntmaxViTImageProcessor, make_image_processor
from .modeling_entmax_vit import (EntmaxViTBackbone, EntmaxViTForImageClassification, EntmaxViTModel,
                                  EntmaxViTPreTrainedModel)

EntmaxViTConfig.register_for_auto_class()
EntmaxViTModel.register_for_auto_class("AutoModel")
EntmaxViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")
EntmaxViTBackbone.register_for_auto_class("AutoBackbone")
EntmaxViTImageProcessor.register_for_auto_class("AutoImageProcessor")

# Local registration so AutoModel works in-process without trust_remote_code.
AutoConfig.register(EntmaxViTConfig.model_type, EntmaxViTConfig, exist_ok=True)
AutoModel.register(EntmaxViTConfig, EntmaxViTModel, exist_ok=True)
AutoModelForImageClassification.register(EntmaxViTConfig, EntmaxViTForImageClassification, exist_ok=True)
AutoBackbone.register(EntmaxViTConfig, EntmaxViTBackbone, exist_ok=True)
AutoImageProcessor.register(EntmaxViTConfig, EntmaxViTImageProcessor, exist_ok=True)

__all__ = ["ATTENTION_KERNELS", "ATTENTION_TRANSFORMS", "EntmaxViTBackbone", "EntmaxViTConfig",
           "EntmaxViTForImageClassification", "EntmaxViTImageProcessor", "EntmaxViTModel", "EntmaxViTPreTrainedModel",
           "IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "PRESET_ALIASES", "get_attention_transform",
           "make_image_processor"]
