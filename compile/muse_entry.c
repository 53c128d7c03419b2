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
 *   MUSE_BLOCKED       defined when the trees are split into units: evaluate
 *                      them unit by unit over blocks of MUSE_BLOCK_ROWS rows
 *   MUSE_BASE_MARGIN   XGBoost models: the margin each row starts from (a float32
 *                      value); the trees' float32 leaves are added to it tree by
 *                      tree, as XGBoost does (codegen.py removes TL2cgen's final
 *                      addition of the base score).  Otherwise rows start at 0.
 *
 * No globals are written, so concurrent calls from many threads are safe. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "header.h"

#define MUSE_ABI_VERSION 1

int32_t muse_abi_version(void) { return MUSE_ABI_VERSION; }
int32_t muse_num_feature(void) { return MUSE_NUM_FEATURE; }

/* result[] as a row starts: XGBoost's base margin, or zeros. */
static inline void muse_start(MUSE_RESULT_TYPE* result) {
#ifdef MUSE_BASE_MARGIN
  for (int k = 0; k < MUSE_OUTPUT_WIDTH; ++k) result[k] = (MUSE_RESULT_TYPE)(MUSE_BASE_MARGIN);
#else
  memset(result, 0, MUSE_OUTPUT_WIDTH * sizeof(MUSE_RESULT_TYPE));
#endif
}

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

#ifdef MUSE_BLOCKED
/* TL2cgen's predict() split in three (see codegen._add_block_entry). */
void muse_prepare(struct Entry* data);
void muse_finish(int pred_margin, MUSE_RESULT_TYPE* result);
extern void (*const muse_units[])(struct Entry*, MUSE_RESULT_TYPE*);
extern const int muse_num_units;

/* Unit u runs over a whole block of rows before unit u+1, so its code is
 * fetched once per block instead of once per row.  Per row, the additions
 * happen in the same order as in predict(): results are bit-identical.
 * Blocks live on the heap: MUSE_BLOCK_ROWS rows of a wide model would not fit
 * a small thread stack. */
#define MUSE_DEFINE_PREDICT(NAME, TYPE)                                        \
  int32_t NAME(const TYPE* X, int64_t nrow, int64_t ncol, int32_t margin,     \
               double* out) {                                                 \
    struct Entry one_row[MUSE_NUM_FEATURE];                                    \
    MUSE_RESULT_TYPE one_result[MUSE_OUTPUT_WIDTH];                           \
    struct Entry* rows = one_row;                                             \
    MUSE_RESULT_TYPE* result = one_result;                                    \
    int64_t block = nrow < MUSE_BLOCK_ROWS ? nrow : MUSE_BLOCK_ROWS;          \
    if (ncol != MUSE_NUM_FEATURE) return -1;                                  \
    if (block > 1) {                                                          \
      rows = malloc((size_t)block * MUSE_NUM_FEATURE * sizeof(struct Entry)); \
      result = malloc((size_t)block * MUSE_OUTPUT_WIDTH * sizeof(MUSE_RESULT_TYPE)); \
      if (!rows || !result) {                                                 \
        free(rows);                                                           \
        free(result);                                                         \
        return -2;                                                            \
      }                                                                       \
    }                                                                         \
    for (int64_t i0 = 0; i0 < nrow; i0 += block) {                            \
      int64_t n = nrow - i0 < block ? nrow - i0 : block;                      \
      for (int64_t r = 0; r < n; ++r) {                                       \
        const TYPE* x = X + (i0 + r) * ncol;                                  \
        struct Entry* row = rows + r * MUSE_NUM_FEATURE;                      \
        for (int64_t j = 0; j < MUSE_NUM_FEATURE; ++j) {                      \
          muse_fill(row, (double)x[j], j);                                    \
        }                                                                     \
        muse_prepare(row);                                                    \
        muse_start(result + r * MUSE_OUTPUT_WIDTH);                           \
      }                                                                       \
      for (int u = 0; u < muse_num_units; ++u) {                              \
        void (*unit)(struct Entry*, MUSE_RESULT_TYPE*) = muse_units[u];       \
        for (int64_t r = 0; r < n; ++r) {                                     \
          unit(rows + r * MUSE_NUM_FEATURE, result + r * MUSE_OUTPUT_WIDTH);  \
        }                                                                     \
      }                                                                       \
      for (int64_t r = 0; r < n; ++r) {                                       \
        muse_finish(margin, result + r * MUSE_OUTPUT_WIDTH);                  \
        out[i0 + r] = result[r * MUSE_OUTPUT_WIDTH + MUSE_OUTPUT_INDEX];      \
      }                                                                       \
    }                                                                         \
    if (block > 1) {                                                          \
      free(rows);                                                             \
      free(result);                                                           \
    }                                                                         \
    return 0;                                                                 \
  }
#else
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
      muse_start(result);                                                     \
      predict(row, margin, result);                                           \
      out[i] = result[MUSE_OUTPUT_INDEX];                                     \
    }                                                                         \
    return 0;                                                                 \
  }
#endif

MUSE_DEFINE_PREDICT(muse_predict_f64, double)
MUSE_DEFINE_PREDICT(muse_predict_f32, float)
