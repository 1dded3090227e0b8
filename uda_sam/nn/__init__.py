"""Plain-PyTorch building blocks: the self-attention module (SAM), its losses, the segmentation networks and their
weights files (:mod:`uda_sam.nn.sam_io`: exported SAM files, network weights from checkpoints).

Every segmentation network implements :class:`SegmentationNetwork` (:mod:`uda_sam.nn.network`), the contract the
tasks rely on; each reads its own weights files (:mod:`uda_sam.nn.deeplabv2_files`, :mod:`uda_sam.nn.fcn8s_files`).

Nothing here imports Lightning or the data code, so ``from uda_sam.nn import SelfAttentionModule,
SelfAttentionLoss, self_attention_loss`` works inside any PyTorch project.
"""

from __future__ import annotations

from .backbones import DilatedResNet, build_vgg16_features, load_weights_only, read_state_dict_file
from .caffe_resnet import CaffeResNet
from .deeplabv2 import AtrousClassifier, CaffeAtrousClassifier, DeepLabV2
from .deeplabv2_files import load_deeplab_state_dict
from .dilated_fcn import DilatedFCN
from .fcn8s import FCN8s
from .fcn8s_files import load_fcn8s_state_dict
from .losses import logit_norm, segmentation_loss, self_attention_loss
from .network import SegmentationNetwork
from .sam import (
    AUTO_FULL_MAX_BYTES,
    SelfAttentionModule,
    attention_map,
    normalize_rows,
    relu_cosine_attention,
    relu_cosine_similarity,
)
from .sam_io import load_network_weights, load_sam, network_state_dict, save_sam
from .sam_loss import SelfAttentionLoss, SelfAttentionTerms

__all__ = [
    "AUTO_FULL_MAX_BYTES",
    "AtrousClassifier",
    "CaffeAtrousClassifier",
    "CaffeResNet",
    "DeepLabV2",
    "DilatedFCN",
    "DilatedResNet",
    "FCN8s",
    "SegmentationNetwork",
    "SelfAttentionLoss",
    "SelfAttentionModule",
    "SelfAttentionTerms",
    "attention_map",
    "build_vgg16_features",
    "load_deeplab_state_dict",
    "load_fcn8s_state_dict",
    "load_network_weights",
    "load_sam",
    "load_weights_only",
    "logit_norm",
    "network_state_dict",
    "normalize_rows",
    "read_state_dict_file",
    "relu_cosine_attention",
    "relu_cosine_similarity",
    "save_sam",
    "segmentation_loss",
    "self_attention_loss",
]
