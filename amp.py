"""--amp: the numeric precision of training and of the retrieval test's feature extraction.

float32 by default (the faithful numbers).  With --amp: bfloat16 autocast on CUDA, and on a CPU
whose processor has native bfloat16 instructions (x86-64 AVX512-BF16 or AMX-BF16, Arm BF16).
Elsewhere bfloat16 is emulated and slower than float32, so --amp says so in one line and runs
float32.  TIRG_CPU_BF16=1 takes the bfloat16 path on any CPU (to measure or test it where the
processor lacks it), TIRG_CPU_BF16=0 the float32 one.

Under autocast the convolutions, linear layers and matrix products run in bfloat16 (with their
float32 weights cast on the fly; the weights, gradients and optimizer state stay float32), and
what follows them (batch norm, ReLU, pooling, the gate's sigmoid) in the dtype it receives.  The
LSTM stays float32 on the CPU (text_model says why).  The normalisation layer, the losses, the
ranking and the recalls run in float32: the features are cast to float32 where they leave the
model (ImgTextCompositionBase.compute_loss, test_retrieval's feature extraction).
"""
import contextlib
import os
import subprocess
import sys

import torch

BFLOAT16 = 'bfloat16'
FLOAT32 = 'float32'
CPU_BF16_ENV = 'TIRG_CPU_BF16'
# /proc/cpuinfo flags of native bfloat16 arithmetic: x86-64 (AVX512-BF16, AMX-BF16), Arm ('bf16'
# in Features).
NATIVE_BF16_FLAGS = {'avx512_bf16', 'amx_bf16', 'bf16'}


class PrecisionSettingError(ValueError):
    """TIRG_CPU_BF16 holds something other than 1 or 0."""


def cpuinfo_has_native_bf16(text):
    """Whether /proc/cpuinfo's text lists a native bfloat16 flag (x86 'flags', Arm 'Features')."""
    for line in text.splitlines():
        key, _, value = line.partition(':')
        if key.strip() in ('flags', 'Features') and NATIVE_BF16_FLAGS & set(value.split()):
            return True
    return False


def cpu_has_native_bf16(platform=sys.platform, cpuinfo='/proc/cpuinfo'):
    """Through what the operating system publishes: /proc/cpuinfo on Linux, sysctl's
    hw.optional.arm.FEAT_BF16 on macOS (Apple M2 and later).  Elsewhere: no."""
    if platform.startswith('linux'):
        try:
            with open(cpuinfo, encoding='utf-8', errors='replace') as f:
                return cpuinfo_has_native_bf16(f.read())
        except OSError:
            return False
    if platform == 'darwin':
        try:
            result = subprocess.run(['sysctl', '-n', 'hw.optional.arm.FEAT_BF16'],
                                    capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return False
        return result.returncode == 0 and result.stdout.strip() == '1'
    return False


def cpu_bf16_override(environ=os.environ):
    """True (TIRG_CPU_BF16=1), False (=0) or None (unset or empty)."""
    value = environ.get(CPU_BF16_ENV, '').strip()
    if value == '':
        return None
    if value not in ('0', '1'):
        raise PrecisionSettingError(f'{CPU_BF16_ENV}={value}: expected 1 (bfloat16 autocast on '
                                    f'the CPU under --amp) or 0 (float32)')
    return value == '1'


def choose(amp, device_type, environ=os.environ, native=None):
    """(precision, notice): the precision a run computes in, and the one line to print at its
    start, or None.  `native`: whether the CPU has native bfloat16 (detected when None)."""
    if not amp:
        return FLOAT32, None
    if device_type == 'cuda':
        return BFLOAT16, None
    if device_type != 'cpu':
        return FLOAT32, (f'--amp: bfloat16 autocast runs on CUDA and on CPUs with native '
                         f'bfloat16, not on {device_type}: computing in float32')
    forced = cpu_bf16_override(environ)
    native = cpu_has_native_bf16() if native is None else native
    if forced is False:
        return FLOAT32, f'--amp: {CPU_BF16_ENV}=0: computing in float32 on the CPU'
    if forced:
        return BFLOAT16, (None if native else
                          f'--amp: {CPU_BF16_ENV}=1: bfloat16 autocast on a CPU without native '
                          f'bfloat16 (emulated: slower than float32)')
    if not native:
        return FLOAT32, ('--amp: this processor has no native bfloat16 (bfloat16 would be slower '
                         'than float32 here): computing in float32')
    return BFLOAT16, None


def autocast(precision, device_type):
    """The context the model's forward passes run in: bfloat16 autocast, or nothing."""
    if precision == BFLOAT16:
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
