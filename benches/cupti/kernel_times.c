// Per-kernel GPU time of any CUDA program, without nsys: a CUPTI injection library. The driver
// loads it when the program initialises CUDA (CUDA_INJECTION64_PATH=…/libkernel_times.so) and it
// records every kernel, memcpy and memset through CUPTI's activity API. At exit it writes one
// line per kernel name to $KERNEL_TIMES_OUT (default kernel_times.tsv):
//   kind <TAB> count <TAB> total_ns <TAB> bytes <TAB> name
// Build and use: see benches/cupti/README.md.
#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SLOTS 8192
#define BUF_BYTES (16u << 20)

typedef struct {
  char *name;
  int kind;
  unsigned long long count, ns, bytes;
} Entry;

static Entry table[SLOTS];
static unsigned long long dropped;

static uint64_t hash(const char *s, int kind) {
  uint64_t h = 1469598103934665603ull ^ (uint64_t)kind;
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

static void add(int kind, const char *name, unsigned long long ns, unsigned long long bytes) {
  if (!name) name = "?";
  for (uint64_t i = hash(name, kind) % SLOTS, n = 0; n < SLOTS; i = (i + 1) % SLOTS, n++) {
    Entry *e = &table[i];
    if (!e->name) {
      e->name = strdup(name);
      e->kind = kind;
    }
    if (e->kind == kind && strcmp(e->name, name) == 0) {
      e->count++;
      e->ns += ns;
      e->bytes += bytes;
      return;
    }
  }
  dropped++;
}

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *buffer = (uint8_t *)aligned_alloc(8, BUF_BYTES);
  *size = *buffer ? BUF_BYTES : 0;
  *max_records = 0;
}

static const char *copy_kind(int k) {
  switch (k) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "memcpy HtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "memcpy DtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "memcpy DtoD";
    default: return "memcpy other";
  }
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size,
                                      size_t valid) {
  (void)ctx, (void)stream, (void)size;
  CUpti_Activity *r = NULL;
  while (cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
    if (r->kind == CUPTI_ACTIVITY_KIND_KERNEL || r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
      CUpti_ActivityKernel11 *k = (CUpti_ActivityKernel11 *)r;
      add(0, k->name, k->end - k->start, 0);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)r;
      add(1, copy_kind(m->copyKind), m->end - m->start, m->bytes);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)r;
      add(2, "memset", m->end - m->start, m->bytes);
    }
  }
  size_t n = 0;
  cuptiActivityGetNumDroppedRecords(ctx, stream, &n);
  dropped += n;
  free(buffer);
}

static void write_table(void) {
  cuptiActivityFlushAll(1);
  const char *path = getenv("KERNEL_TIMES_OUT");
  FILE *f = fopen(path && *path ? path : "kernel_times.tsv", "w");
  if (!f) return;
  static const char *kinds[] = {"kernel", "memcpy", "memset"};
  for (int i = 0; i < SLOTS; i++)
    if (table[i].name)
      fprintf(f, "%s\t%llu\t%llu\t%llu\t%s\n", kinds[table[i].kind], table[i].count, table[i].ns,
              table[i].bytes, table[i].name);
  if (dropped) fprintf(f, "dropped\t%llu\t0\t0\trecords CUPTI or the table dropped\n", dropped);
  fclose(f);
}

int InitializeInjection(void) {
  if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) return 0;
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  atexit(write_table);
  return 1;
}
