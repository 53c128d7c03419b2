/* Batched entry points compiled into every MUSE model library, beside the
 * trees of one of codegen.py's two generators.  The predicated generator writes
 * forest.h (node arrays), which the walk under MUSE_PREDICATED scores.  The
 * if/else generator is TL2cgen's: its own predict() scores one row held
 * in an array of `struct Entry` (a union in stock TL2cgen: see codegen.py); the loops below fill that array row by row
 * and call it, so a whole batch costs one native call and no allocation.  The predicated walk
 * allocates its block's buffers once a call (two malloc/free pairs, ~0.1 us against ~20 us for
 * one row of a 500-tree model): a wide model's block would not fit a small thread stack.
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
 *   MUSE_PREDICATED    defined when codegen wrote forest.h (node arrays) instead of
 *                      TL2cgen's if/else trees: the walk below replaces predict()
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
#ifndef MUSE_PREDICATED
#include "header.h"
#endif

#define MUSE_ABI_VERSION 1

int32_t muse_abi_version(void) { return MUSE_ABI_VERSION; }
int32_t muse_num_feature(void) { return MUSE_NUM_FEATURE; }

#ifdef MUSE_PREDICATED
/* The predicated walk (codegen.generate_forest).  Every split is `xt[col] > a`, on a row of
 * columns (x, -x, or "is a number", per feature) that muse_columns_* fill, so a node costs a
 * few loads, a compare and an add, with no branch to mispredict: next = first + (xt[col] > a).
 * A NaN compares false and takes `first`, the node's default child; a leaf loops to itself.
 * Walks run side by side to hide the loads' latency: MUSE_ROW_GROUP rows through one tree
 * (batches: a tree's nodes stay in L1 across a block of rows), or, for rows left over and for
 * single rows, MUSE_TREE_GROUP trees of similar depth for one row.  Each walk takes its tree's
 * (group's) depth in steps.  Leaves are added to the row's sum in tree order, in the model's
 * leaf type, from the base margin (XGBoost) or zero, so sums are bit-identical to the library's. */
#define MUSE_ROW_GROUP 8
#ifndef MUSE_ROW_BLOCK
#define MUSE_ROW_BLOCK 64
#endif

#ifdef MUSE_LIGHTGBM_ZERO
#define MUSE_IN32(v) muse_zero32(v)
#define MUSE_IN64(v) muse_zero64(v)
static inline float muse_zero32(float v) { return fabsf(v) <= 1e-35f ? 0.0f : v; }
static inline double muse_zero64(double v) { return fabs(v) <= (double)1e-35f ? 0.0 : v; }
#else
#define MUSE_IN32(v) (v)
#define MUSE_IN64(v) (v)
#endif
#include "forest.h"
#if MUSE_TREE_GROUP != 8
#error "the walks below take MUSE_TREE_GROUP == 8 trees"
#endif

#ifdef MUSE_BASE_MARGIN
#define MUSE_START ((MUSE_LEAF_TYPE)(MUSE_BASE_MARGIN))
#else
#define MUSE_START ((MUSE_LEAF_TYPE)0)
#endif

#define MUSE_R8(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
#define MUSE_STEP(r, XT, A) { uint32_t n_ = i##r; i##r = muse_first[n_] + ((XT)[muse_col[n_]] > A[n_]); }

static inline double muse_output(int32_t margin, MUSE_LEAF_TYPE sum) {
  if (margin) return (double)sum;
  /* TL2cgen's sigmoid postprocessor, in the leaf type */
  return (double)((MUSE_LEAF_TYPE)1 / ((MUSE_LEAF_TYPE)1 + MUSE_EXP(-(MUSE_LEAF_TYPE)(MUSE_SIGMOID_ALPHA) * sum)));
}

#define MUSE_DEFINE_WALKS(SUF, XT_T, A)                                                    \
  /* MUSE_ROW_GROUP rows (stride MUSE_NCOL) through tree t, adding its leaves to acc */    \
  static inline void muse_rows_##SUF(int t, const XT_T* xt, MUSE_LEAF_TYPE* acc) {        \
    uint32_t root = muse_root[t];                                                          \
    int depth = muse_depth[t];                                                             \
    MUSE_R8(MUSE_DECL_ROOT)                                                                \
    for (int k = 0; k < depth; ++k) { MUSE_R8(MUSE_STEP_ROW_##SUF) }                       \
    MUSE_R8(MUSE_ADD_ROW)                                                                  \
  }                                                                                        \
  /* one row through every tree, MUSE_TREE_GROUP at a time; leaves summed in tree order */ \
  static inline MUSE_LEAF_TYPE muse_one_##SUF(const XT_T* xt, MUSE_LEAF_TYPE* leaf) {      \
    const uint32_t* gt = muse_group_tree;                                                  \
    for (int g = 0; g < MUSE_NGROUP; ++g, gt += MUSE_TREE_GROUP) {                         \
      int depth = muse_group_depth[g];                                                     \
      MUSE_R8(MUSE_DECL_GROUP)                                                             \
      for (int k = 0; k < depth; ++k) { MUSE_R8(MUSE_STEP_ONE_##SUF) }                     \
      MUSE_R8(MUSE_PUT_LEAF)                                                               \
    }                                                                                      \
    MUSE_LEAF_TYPE sum = MUSE_START;                                                       \
    for (int t = 0; t < MUSE_NTREE; ++t) sum += leaf[t];                                   \
    return sum;                                                                            \
  }

#define MUSE_DECL_ROOT(r) uint32_t i##r = root;
#define MUSE_ADD_ROW(r) acc[r] += muse_leaf[i##r];
#define MUSE_DECL_GROUP(r) uint32_t i##r = muse_root[gt[r]];
#define MUSE_PUT_LEAF(r) leaf[gt[r]] = muse_leaf[i##r];
#define MUSE_STEP_ROW_f32(r) MUSE_STEP(r, xt + (r) * MUSE_NCOL, muse_a32)
#define MUSE_STEP_ONE_f32(r) MUSE_STEP(r, xt, muse_a32)
MUSE_DEFINE_WALKS(f32, float, muse_a32)
#ifdef MUSE_DOUBLE_ROWS
#define MUSE_STEP_ROW_f64(r) MUSE_STEP(r, xt + (r) * MUSE_NCOL, muse_a64)
#define MUSE_STEP_ONE_f64(r) MUSE_STEP(r, xt, muse_a64)
MUSE_DEFINE_WALKS(f64, double, muse_a64)
#define MUSE_WALK_F64 f64
#define MUSE_XT_F64 double
#else
#define MUSE_WALK_F64 f32 /* inputs are rounded to float32 (XGBoost): float columns */
#define MUSE_XT_F64 float
#endif

#define MUSE_CAT_(a, b) a##b
#define MUSE_CAT(a, b) MUSE_CAT_(a, b)

/* Blocks of MUSE_ROW_BLOCK rows: their columns, then each tree over the block's full groups of
 * MUSE_ROW_GROUP rows; the rest of the block row by row.  Buffers on the heap: a wide model's
 * block would not fit a small thread stack. */
#define MUSE_DEFINE_PREDICT(NAME, IN_T, XT_T, WALK, COLUMNS)                                 \
  int32_t NAME(const IN_T* X, int64_t nrow, int64_t ncol, int32_t margin, double* out) {    \
    int64_t block = nrow < MUSE_ROW_BLOCK ? nrow : MUSE_ROW_BLOCK;                           \
    XT_T* xt;                                                                                \
    MUSE_LEAF_TYPE* acc;                                                                     \
    MUSE_LEAF_TYPE* leaf;                                                                    \
    if (ncol != MUSE_NUM_FEATURE) return -1;                                                 \
    if (nrow <= 0) return 0;                                                                 \
    xt = malloc((size_t)block * MUSE_NCOL * sizeof(XT_T));                                   \
    acc = malloc((size_t)(block + MUSE_NTREE + 1) * sizeof(MUSE_LEAF_TYPE));                 \
    if (!xt || !acc) {                                                                       \
      free(xt);                                                                              \
      free(acc);                                                                             \
      return -2;                                                                             \
    }                                                                                        \
    leaf = acc + block;                                                                      \
    for (int64_t i0 = 0; i0 < nrow; i0 += block) {                                           \
      int n = (int)(nrow - i0 < block ? nrow - i0 : block);                                  \
      int grouped = n - n % MUSE_ROW_GROUP;                                                  \
      for (int r = 0; r < n; ++r) {                                                          \
        COLUMNS(X + (i0 + r) * MUSE_NUM_FEATURE, xt + (int64_t)r * MUSE_NCOL);               \
        acc[r] = MUSE_START;                                                                 \
      }                                                                                      \
      if (grouped) {                                                                         \
        for (int t = 0; t < MUSE_NTREE; ++t) {                                               \
          for (int g = 0; g < grouped; g += MUSE_ROW_GROUP) {                                \
            MUSE_CAT(muse_rows_, WALK)(t, xt + (int64_t)g * MUSE_NCOL, acc + g);             \
          }                                                                                  \
        }                                                                                    \
      }                                                                                      \
      for (int r = grouped; r < n; ++r) {                                                    \
        acc[r] = MUSE_CAT(muse_one_, WALK)(xt + (int64_t)r * MUSE_NCOL, leaf);               \
      }                                                                                      \
      for (int r = 0; r < n; ++r) out[i0 + r] = muse_output(margin, acc[r]);                 \
    }                                                                                        \
    free(xt);                                                                                \
    free(acc);                                                                               \
    return 0;                                                                                \
  }

MUSE_DEFINE_PREDICT(muse_predict_f64, double, MUSE_XT_F64, MUSE_WALK_F64, muse_columns_f64)
MUSE_DEFINE_PREDICT(muse_predict_f32, float, float, f32, muse_columns_f32)

#else /* TL2cgen's trees */
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
#endif /* MUSE_PREDICATED */
