/* Batched entry points compiled into every MUSE model library, beside the
 * tree code TL2cgen generates.  TL2cgen's own predict() scores one row held
 * in an array of `union Entry`; the loops below fill that array row by row
 * and call it, so a whole batch costs one native call and no allocation.
 *
 * Compile-time definitions (set by muse.compile.codegen):
 *   MUSE_NUM_FEATURE   columns per row
 *   MUSE_OUTPUT_WIDTH  doubles predict() writes per row (targets x classes)
 *   MUSE_OUTPUT_INDEX  which of them is the positive-class score
 *   MUSE_LIGHTGBM_ZERO defined for LightGBM models: copy LightGBM's rule that
 *                      0 < |x| <= 1e-35 reads as exactly zero (kZeroThreshold)
 *
 * No globals are written, so concurrent calls from many threads are safe. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "header.h"

#define MUSE_ABI_VERSION 1

int32_t muse_abi_version(void) { return MUSE_ABI_VERSION; }
int32_t muse_num_feature(void) { return MUSE_NUM_FEATURE; }

static inline void muse_fill(union Entry* row, double v, int64_t j) {
  if (isnan(v)) {
    row[j].missing = -1;
  } else {
#ifdef MUSE_LIGHTGBM_ZERO
    if (fabs(v) <= 1e-35) v = 0.0;
#endif
    row[j].fvalue = v;
  }
}

#define MUSE_DEFINE_PREDICT(NAME, TYPE)                                        \
  int32_t NAME(const TYPE* X, int64_t nrow, int64_t ncol, int32_t margin,     \
               double* out) {                                                 \
    union Entry row[MUSE_NUM_FEATURE];                                        \
    double result[MUSE_OUTPUT_WIDTH];                                         \
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
