/* Batched entry points compiled into every MUSE model library, beside the
 * tree code TL2cgen generates.  TL2cgen's own predict() scores one row held
 * in an array of `struct Entry` (a union in stock TL2cgen: see codegen.py); the loops below fill that array row by row
 * and call it, so a whole batch costs one native call and no allocation.
 *
 * Compile-time definitions (set by muse.compile.codegen):
 *   MUSE_NUM_FEATURE   columns per row
 *   MUSE_OUTPUT_WIDTH  doubles predict() writes per row (targets x classes)
 *   MUSE_OUTPUT_INDEX  which of them is the positive-class score
 *   MUSE_RESULT_TYPE   the C type predict() writes (double, or float for XGBoost)
 *   MUSE_LIGHTGBM_ZERO defined for LightGBM models: copy LightGBM's rule that
 *                      0 < |x| <= 1e-35f reads as exactly zero, as its C API
 *                      drops such values from a row (kZeroThreshold)
 *   MUSE_FLOAT32_INPUTS defined where the library rounds inputs to float32
 *                      before comparing with its thresholds (XGBoost, sklearn trees)
 *
 * No globals are written, so concurrent calls from many threads are safe. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "header.h"

#define MUSE_ABI_VERSION 1

int32_t muse_abi_version(void) { return MUSE_ABI_VERSION; }
int32_t muse_num_feature(void) { return MUSE_NUM_FEATURE; }

static inline void muse_fill(struct Entry* row, double v, int64_t j) {
  if (isnan(v)) {
    row[j].missing = -1;
  } else {
    row[j].missing = 0;
#ifdef MUSE_FLOAT32_INPUTS
    v = (double)(float)v;
#endif
#ifdef MUSE_LIGHTGBM_ZERO
    if (fabs(v) <= (double)1e-35f) v = 0.0;  /* LightGBM's kZeroThreshold is a float */
#endif
    row[j].fvalue = v;
  }
}

#define MUSE_DEFINE_PREDICT(NAME, TYPE)                                        \
  int32_t NAME(const TYPE* X, int64_t nrow, int64_t ncol, int32_t margin,     \
               double* out) {                                                 \
    struct Entry row[MUSE_NUM_FEATURE];                                        \
    MUSE_RESULT_TYPE result[MUSE_OUTPUT_WIDTH];                               \
    if (ncol != MUSE_NUM_FEATURE) return -1;                                  \
    for (int64_t i = 0; i < nrow; ++i) {                                      \
      const TYPE* x = X + i * ncol;                                           \
      for (int64_t j = 0; j < MUSE_NUM_FEATURE; ++j) {                        \
        muse_fill(row, (double)x[j], j);                                      \
      }                                                                       \
      memset(result, 0, sizeof(result));                                     \
      predict(row, margin, result);                                           \
      out[i] = result[MUSE_OUTPUT_INDEX];                                     \
    }                                                                         \
    return 0;                                                                 \
  }

MUSE_DEFINE_PREDICT(muse_predict_f64, double)
MUSE_DEFINE_PREDICT(muse_predict_f32, float)
