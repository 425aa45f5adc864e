// Emulation stand-in for cuda_fp16.h: __half with round-to-nearest-even conversions.
#pragma once
#include "../emu.h"

struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }  // IEEE: nearest even
inline __half __float2half(float f) { return __float2half_rn(f); }
