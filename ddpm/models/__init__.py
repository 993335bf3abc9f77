"""Networks: the denoising U-Net and the LeNet-5 used for the Frechet LeNet Distance."""

from ddpm.models.lenet import LeNet5
from ddpm.models.summary import count_parameters, summary_table
from ddpm.models.unet import UNet, build_unet, null_label

__all__ = ["UNet", "build_unet", "null_label", "LeNet5", "count_parameters", "summary_table"]
