// Per-kernel GPU time of any CUDA program, without nsys: a CUPTI injection library. The driver
// loads it when the program initialises CUDA (CUDA_INJECTION64_PATH=…/libkernel_times.so) and it
// records every kernel, memcpy and memset through CUPTI's activity API. At exit it writes one
// line per kernel name to $KERNEL_TIMES_OUT (default kernel_times.tsv):
//   kind <TAB> count <TAB> total_ns <TAB> bytes <TAB> name
// and the same per phase of `cim-run bench` to $KERNEL_TIMES_OUT.phases:
//   phase <TAB> kind <TAB> count <TAB> total_ns <TAB> bytes <TAB> name
// The bench marks the end of each phase, when CIM_PHASE_MARKERS is set, with a memset of an odd
// size 1001 + 2·i bytes (phase i of tok_encode, gen_fwd_bwd, sample_decode, enh_fwd_bwd, optim;
// no f32/bf16 tensor has an odd byte count); every record is given the phase of the first marker
// after it in time ("after" past the last one).
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

// Every record, for the per-phase table: start time, table slot, duration, bytes.
typedef struct {
  unsigned long long start, ns, bytes;
  int slot;
} Rec;
static Rec *recs;
static size_t n_recs, cap_recs;
#define MARKER_BASE 1001ull
#define PHASES 5
static const char *phase_names[PHASES] = {"tok_encode", "gen_fwd_bwd", "sample_decode",
                                          "enh_fwd_bwd", "optim"};

static uint64_t hash(const char *s, int kind) {
  uint64_t h = 1469598103934665603ull ^ (uint64_t)kind;
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

static void keep(unsigned long long start, unsigned long long ns, unsigned long long bytes,
                 int slot) {
  if (n_recs == cap_recs) {
    size_t cap = cap_recs ? 2 * cap_recs : 65536;
    Rec *r = (Rec *)realloc(recs, cap * sizeof(Rec));
    if (!r) return;
    recs = r, cap_recs = cap;
  }
  recs[n_recs++] = (Rec){start, ns, bytes, slot};
}

static void add(int kind, const char *name, unsigned long long start, unsigned long long ns,
                unsigned long long bytes) {
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
      keep(start, ns, bytes, (int)i);
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
      add(0, k->name, k->start, k->end - k->start, 0);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)r;
      add(1, copy_kind(m->copyKind), m->start, m->end - m->start, m->bytes);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)r;
      add(2, "memset", m->start, m->end - m->start, m->bytes);
    }
  }
  size_t n = 0;
  cuptiActivityGetNumDroppedRecords(ctx, stream, &n);
  dropped += n;
  free(buffer);
}

static int by_start(const void *a, const void *b) {
  const Rec *x = (const Rec *)a, *y = (const Rec *)b;
  return x->start < y->start ? -1 : x->start > y->start;
}

static int marker_phase(const Rec *r) {
  if (table[r->slot].kind != 2 || r->bytes < MARKER_BASE || (r->bytes - MARKER_BASE) % 2) return -1;
  unsigned long long i = (r->bytes - MARKER_BASE) / 2;
  return i < PHASES ? (int)i : -1;
}

// Per phase and slot: count, ns, bytes (phase PHASES: after the last marker).
static unsigned long long (*by_phase)[SLOTS][3];

static void write_phases(const char *path) {
  if (!n_recs) return;
  by_phase = calloc(PHASES + 1, sizeof *by_phase);
  if (!by_phase) return;
  qsort(recs, n_recs, sizeof(Rec), by_start);
  int phase = PHASES;
  for (size_t k = n_recs; k-- > 0;) {
    int m = marker_phase(&recs[k]);
    if (m >= 0) {
      phase = m;
      continue;
    }
    unsigned long long *c = by_phase[phase][recs[k].slot];
    c[0]++, c[1] += recs[k].ns, c[2] += recs[k].bytes;
  }
  char name[4096];
  snprintf(name, sizeof name, "%s.phases", path);
  FILE *f = fopen(name, "w");
  if (!f) return;
  static const char *kinds[] = {"kernel", "memcpy", "memset"};
  for (int p = 0; p <= PHASES; p++)
    for (int i = 0; i < SLOTS; i++)
      if (by_phase[p][i][0])
        fprintf(f, "%s\t%s\t%llu\t%llu\t%llu\t%s\n", p < PHASES ? phase_names[p] : "after",
                kinds[table[i].kind], by_phase[p][i][0], by_phase[p][i][1], by_phase[p][i][2],
                table[i].name);
  fclose(f);
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
  write_phases(path && *path ? path : "kernel_times.tsv");
}

int InitializeInjection(void) {
  if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) return 0;
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  atexit(write_table);
  return 1;
}
