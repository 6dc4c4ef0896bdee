/*
 * vixDiskLibSample.c - a C sample for libvixDiskLib, in the manner of the
 * vixDiskLibSample program shipped with VMware's VDDK (same commands and
 * options: local disk files, or a server given with -host and the nbd/nbdssl
 * transports). It is written against the documented VDDK API only, so it
 * builds against vdisk's include/vixDiskLib.h and, unchanged, against VMware's
 * own header.
 *
 *   vixDiskLibSample command [options] diskPath
 *
 * Run it without arguments for the list of commands and options; README.md
 * beside it has examples.
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "vixDiskLib.h"

/* The header defines no version macros; VMware's samples define their own. */
#define SAMPLE_VERSION_MAJOR 8
#define SAMPLE_VERSION_MINOR 0

#define SECTOR VIXDISKLIB_SECTOR_SIZE
#define BENCH_REPORT_BYTES (64ULL * 1024 * 1024)
#define ASYNC_POOL_SIZE 32

enum command {
   CMD_NONE = 0,
   CMD_CREATE,
   CMD_REDO,
   CMD_INFO,
   CMD_DUMP,
   CMD_FILL,
   CMD_WMETA,
   CMD_RMETA,
   CMD_META,
   CMD_CLONE,
   CMD_READBENCH,
   CMD_WRITEBENCH,
   CMD_READASYNCBENCH,
   CMD_WRITEASYNCBENCH,
   CMD_CHECKREPAIR,
   CMD_GETALLOCATEDBLOCKS,
};

static struct {
   enum command command;
   const char *diskPath;
   const char *parentPath;   /* -redo */
   const char *srcPath;      /* -clone */
   const char *metaKey;      /* -wmeta, -rmeta */
   const char *metaVal;      /* -wmeta */
   const char *libdir;       /* -libdir */
   const char *cfgFile;      /* -initex */
   const char *modes;        /* -mode: transport modes for ConnectEx */
   const char *host;         /* -host: serverName (a remote connection) */
   const char *user;         /* -user */
   const char *password;     /* -password */
   const char *vmxSpec;      /* -vm */
   const char *thumbPrint;   /* -thumb */
   const char *ssMoref;      /* -ssmoref: ConnectEx's snapshotRef */
   uint32_t port;            /* -port */
   uint32_t nfcHostPort;     /* -nfchostport */
   int useInit;              /* -init: deprecated VixDiskLib_Init */
   int useConnectEx;         /* -connectex or -mode */
   int quiet;                /* -q: no "Log:" lines */
   uint64_t start;           /* -start (sectors) */
   uint64_t count;           /* -count (sectors) */
   int fillValue;            /* -val */
   uint64_t mbSize;          /* -cap (MB) */
   int capGiven;
   VixDiskLibAdapterType adapterType;
   VixDiskLibDiskType diskType;
   int typeGiven;
   uint16_t hwVersion;
   uint32_t logicalSectorSize;
   uint32_t physicalSectorSize;
   uint32_t openFlags;
   uint64_t bufSectors;      /* -readbench/-writebench block size */
   uint64_t chunkSize;       /* -getallocatedblocks */
   int repair;               /* -check */

   /* State, released by cleanup(). */
   int initialized;
   int accessPrepared;       /* PrepareForAccess succeeded: EndAccess at the end */
   VixDiskLibConnectParams *allocatedParams;
   VixDiskLibConnection connection;
   VixDiskLibHandle diskHandle;
} app;

static void cleanup(void);

/* ------------------------------------------------------------------------ */
/* Errors                                                                    */
/* ------------------------------------------------------------------------ */

/* Prints the library's text for err and exits with status 1. */
static void
fail(VixError err, const char *what, int line)
{
   char *text = VixDiskLib_GetErrorText(err, NULL);

   fprintf(stderr, "Error: %s failed at line %d: %s (VixError %" PRIu64 ")\n",
           what, line, text != NULL ? text : "(no error text)",
           (uint64_t)err);
   VixDiskLib_FreeErrorText(text);
   cleanup();
   exit(1);
}

#define CHECK(call)                                                        \
   do {                                                                   \
      VixError check_err_ = (call);                                        \
      if (VIX_FAILED(check_err_)) {                                        \
         fail(check_err_, #call, __LINE__);                                \
      }                                                                    \
   } while (0)

static void
die(const char *fmt, ...)
{
   va_list ap;

   fprintf(stderr, "Error: ");
   va_start(ap, fmt);
   vfprintf(stderr, fmt, ap);
   va_end(ap);
   fprintf(stderr, "\n");
   cleanup();
   exit(1);
}

static void *
xmalloc(size_t n)
{
   void *p = malloc(n != 0 ? n : 1);

   if (p == NULL) {
      die("out of memory (%zu bytes)", n);
   }
   return p;
}

/* ------------------------------------------------------------------------ */
/* Callbacks                                                                 */
/* ------------------------------------------------------------------------ */

static void
log_line(const char *prefix, const char *fmt, va_list args)
{
   char buf[4096];
   size_t n;

   vsnprintf(buf, sizeof buf, fmt, args);
   n = strlen(buf);
   while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) {
      buf[--n] = '\0';
   }
   fprintf(stderr, "%s%s\n", prefix, buf);
}

static void
LogFunc(const char *fmt, va_list args)
{
   if (!app.quiet) {
      log_line("Log: ", fmt, args);
   }
}

static void
WarnFunc(const char *fmt, va_list args)
{
   log_line("Warning: ", fmt, args);
}

static void
PanicFunc(const char *fmt, va_list args)
{
   log_line("Panic: ", fmt, args);
   exit(10);
}

static int lastPercent = -1;

static Bool
ProgressFunc(void *progressData, int percentCompleted)
{
   const char *what = progressData != NULL ? progressData : "Progress";

   if (percentCompleted != lastPercent) {
      lastPercent = percentCompleted;
      fprintf(stderr, "%s: %d%%\n", what, percentCompleted);
   }
   return TRUE;
}

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */
/* ------------------------------------------------------------------------ */

static double
now_seconds(void)
{
   struct timespec ts;

   clock_gettime(CLOCK_MONOTONIC, &ts);
   return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void
open_disk(const char *path, uint32_t flags, VixDiskLibHandle *handle)
{
   VixError err = VixDiskLib_Open(app.connection, path, flags, handle);

   if (VIX_FAILED(err)) {
      char what[4200];

      snprintf(what, sizeof what, "VixDiskLib_Open(%s, flags 0x%x)", path,
               (unsigned)flags);
      fail(err, what, __LINE__);
   }
}

static VixDiskLibSectorType
disk_capacity(VixDiskLibHandle handle)
{
   VixDiskLibInfo *info = NULL;
   VixDiskLibSectorType capacity;

   CHECK(VixDiskLib_GetInfo(handle, &info));
   capacity = info->capacity;
   VixDiskLib_FreeInfo(info);
   return capacity;
}

static const char *
adapter_name(VixDiskLibAdapterType type)
{
   switch (type) {
   case VIXDISKLIB_ADAPTER_IDE:
      return "IDE";
   case VIXDISKLIB_ADAPTER_SCSI_BUSLOGIC:
      return "BusLogic SCSI";
   case VIXDISKLIB_ADAPTER_SCSI_LSILOGIC:
      return "LsiLogic SCSI";
   default:
      return "unknown";
   }
}

/*
 * One line per 16 bytes, in the format of `xxd -g1` with absolute disk
 * offsets, so a dump can be compared with `xxd -g1 -s OFF -l LEN raw`.
 */
static void
dump_bytes(const unsigned char *buf, size_t n, uint64_t offset)
{
   size_t i, k;

   for (i = 0; i < n; i += 16) {
      size_t len = n - i < 16 ? n - i : 16;

      printf("%08" PRIx64 ":", offset + i);
      for (k = 0; k < 16; k++) {
         if (k < len) {
            printf(" %02x", buf[i + k]);
         } else {
            printf("   ");
         }
      }
      printf("  ");
      for (k = 0; k < len; k++) {
         unsigned char c = buf[i + k];
         putchar(c >= 0x20 && c < 0x7f ? c : '.');
      }
      putchar('\n');
   }
}

/* ------------------------------------------------------------------------ */
/* Commands                                                                  */
/* ------------------------------------------------------------------------ */

static void
DoCreate(void)
{
   VixDiskLibCreateParams createParams;

   memset(&createParams, 0, sizeof createParams);
   createParams.diskType = app.diskType;
   createParams.adapterType = app.adapterType;
   createParams.hwVersion = app.hwVersion;
   createParams.capacity = app.mbSize * 2048;
   createParams.logicalSectorSize = app.logicalSectorSize;
   createParams.physicalSectorSize = app.physicalSectorSize;
   lastPercent = -1;
   CHECK(VixDiskLib_Create(app.connection, app.diskPath, &createParams,
                           ProgressFunc, (void *)"Creating"));
   printf("created %s: %" PRIu64 " sectors, disk type %d, adapter %s\n",
          app.diskPath, (uint64_t)createParams.capacity,
          (int)createParams.diskType, adapter_name(createParams.adapterType));
}

static void
DoRedo(void)
{
   VixDiskLibHandle parent = NULL;
   VixDiskLibDiskType childType =
      app.typeGiven ? app.diskType : VIXDISKLIB_DISK_MONOLITHIC_SPARSE;
   VixError err;

   open_disk(app.parentPath, app.openFlags, &parent);
   lastPercent = -1;
   err = VixDiskLib_CreateChild(parent, app.diskPath, childType, ProgressFunc,
                                (void *)"Creating child");
   if (VIX_FAILED(err)) {
      VixDiskLib_Close(parent);
      fail(err, "VixDiskLib_CreateChild", __LINE__);
   }
   CHECK(VixDiskLib_Close(parent));
   printf("created child %s of %s\n", app.diskPath, app.parentPath);
}

static void
DoInfo(void)
{
   VixDiskLibInfo *info = NULL;
   const char *mode;

   CHECK(VixDiskLib_GetInfo(app.diskHandle, &info));
   printf("capacity          = %" PRIu64 " sectors\n", (uint64_t)info->capacity);
   printf("number of links   = %d\n", info->numLinks);
   printf("adapter type      = %s\n", adapter_name(info->adapterType));
   printf("BIOS geometry     = %u/%u/%u\n", (unsigned)info->biosGeo.cylinders,
          (unsigned)info->biosGeo.heads, (unsigned)info->biosGeo.sectors);
   printf("physical geometry = %u/%u/%u\n", (unsigned)info->physGeo.cylinders,
          (unsigned)info->physGeo.heads, (unsigned)info->physGeo.sectors);
   printf("parent file name hint = %s\n",
          info->parentFileNameHint != NULL ? info->parentFileNameHint : "(none)");
   printf("uuid              = %s\n", info->uuid != NULL ? info->uuid : "(none)");
   printf("logical sector size  = %u\n", (unsigned)info->logicalSectorSize);
   printf("physical sector size = %u\n", (unsigned)info->physicalSectorSize);
   VixDiskLib_FreeInfo(info);

   mode = VixDiskLib_GetTransportMode(app.diskHandle);
   printf("transport mode    = %s\n", mode != NULL ? mode : "(null)");
   printf("Transport modes supported by vixDiskLib: %s\n",
          VixDiskLib_ListTransportModes());
}

static void
DoDump(void)
{
   unsigned char buf[SECTOR];
   uint64_t i;

   for (i = 0; i < app.count; i++) {
      CHECK(VixDiskLib_Read(app.diskHandle, app.start + i, 1, buf));
      dump_bytes(buf, sizeof buf, (app.start + i) * SECTOR);
   }
}

static void
DoFill(void)
{
   unsigned char buf[SECTOR];
   uint64_t i;

   memset(buf, app.fillValue, sizeof buf);
   /* One sector per call, as VMware's sample does. */
   for (i = 0; i < app.count; i++) {
      CHECK(VixDiskLib_Write(app.diskHandle, app.start + i, 1, buf));
   }
   printf("filled %" PRIu64 " sectors from %" PRIu64 " with 0x%02x\n",
          app.count, app.start, (unsigned)app.fillValue);
}

static void
DoWriteMeta(void)
{
   CHECK(VixDiskLib_WriteMetadata(app.diskHandle, app.metaKey, app.metaVal));
   printf("%s = %s written\n", app.metaKey, app.metaVal);
}

/* Reads one metadata value with the size-probe protocol; the caller frees. */
static char *
read_meta(const char *key)
{
   size_t requiredLen = 0;
   char *val;
   VixError err;

   err = VixDiskLib_ReadMetadata(app.diskHandle, key, NULL, 0, &requiredLen);
   if (err != VIX_OK && err != VIX_E_BUFFER_TOOSMALL) {
      fail(err, "VixDiskLib_ReadMetadata (size probe)", __LINE__);
   }
   val = xmalloc(requiredLen + 1);
   err = VixDiskLib_ReadMetadata(app.diskHandle, key, val, requiredLen, NULL);
   if (VIX_FAILED(err)) {
      free(val);
      fail(err, "VixDiskLib_ReadMetadata", __LINE__);
   }
   val[requiredLen] = '\0';
   return val;
}

static void
DoReadMeta(void)
{
   char *val = read_meta(app.metaKey);

   printf("%s = %s\n", app.metaKey, val);
   free(val);
}

static void
DoMeta(void)
{
   size_t requiredLen = 0;
   char *keys, *key;
   VixError err;

   err = VixDiskLib_GetMetadataKeys(app.diskHandle, NULL, 0, &requiredLen);
   if (err != VIX_OK && err != VIX_E_BUFFER_TOOSMALL) {
      fail(err, "VixDiskLib_GetMetadataKeys (size probe)", __LINE__);
   }
   keys = xmalloc(requiredLen + 2);
   err = VixDiskLib_GetMetadataKeys(app.diskHandle, keys, requiredLen, NULL);
   if (VIX_FAILED(err)) {
      free(keys);
      fail(err, "VixDiskLib_GetMetadataKeys", __LINE__);
   }
   keys[requiredLen] = '\0';
   keys[requiredLen + 1] = '\0';
   /* Consecutive NUL-terminated keys, ended by an empty one. */
   for (key = keys; *key != '\0' && key < keys + requiredLen;
        key += strlen(key) + 1) {
      char *val = read_meta(key);
      printf("%s = %s\n", key, val);
      free(val);
   }
   free(keys);
}

static void
DoClone(void)
{
   VixDiskLibConnectParams localParams;
   VixDiskLibConnection localConnection = NULL, srcConnection, dstConnection;
   VixDiskLibCreateParams createParams;
   VixError err;

   /* A second, local connection (zeroed params): the source's, or with -host
    * the destination's (a disk of the server copied into a local file, as
    * VMware's sample does). */
   memset(&localParams, 0, sizeof localParams);
   CHECK(VixDiskLib_Connect(&localParams, &localConnection));
   if (app.host != NULL) {
      srcConnection = app.connection;
      dstConnection = localConnection;
   } else {
      srcConnection = localConnection;
      dstConnection = app.connection;
   }

   memset(&createParams, 0, sizeof createParams);
   createParams.diskType = app.diskType;
   createParams.adapterType = app.adapterType;
   createParams.hwVersion = app.hwVersion;
   createParams.logicalSectorSize = app.logicalSectorSize;
   createParams.physicalSectorSize = app.physicalSectorSize;
   if (app.capGiven) {
      createParams.capacity = app.mbSize * 2048;
   } else {
      VixDiskLibHandle src = NULL;

      err = VixDiskLib_Open(srcConnection, app.srcPath,
                            VIXDISKLIB_FLAG_OPEN_READ_ONLY, &src);
      if (VIX_FAILED(err)) {
         VixDiskLib_Disconnect(localConnection);
         fail(err, "VixDiskLib_Open (clone source)", __LINE__);
      }
      createParams.capacity = disk_capacity(src);
      CHECK(VixDiskLib_Close(src));
   }

   lastPercent = -1;
   err = VixDiskLib_Clone(dstConnection, app.diskPath, srcConnection,
                          app.srcPath, &createParams, ProgressFunc,
                          (void *)"Cloning", TRUE);
   if (VIX_FAILED(err)) {
      VixDiskLib_Disconnect(localConnection);
      fail(err, "VixDiskLib_Clone", __LINE__);
   }
   CHECK(VixDiskLib_Disconnect(localConnection));
   printf("cloned %s to %s (disk type %d)\n", app.srcPath, app.diskPath,
          (int)createParams.diskType);
}

static void
bench_report(const char *name, uint64_t bytes, double seconds)
{
   double mibs = seconds > 0 ? (double)bytes / (1024.0 * 1024.0) / seconds : 0;

   printf("%s: %" PRIu64 " bytes in %.3f s: %.2f MiB/s\n", name, bytes,
          seconds, mibs);
}

static void
DoBench(int writing)
{
   const char *name = writing ? "writebench" : "readbench";
   uint64_t bs = app.bufSectors != 0 ? app.bufSectors : 128;
   VixDiskLibSectorType capacity = disk_capacity(app.diskHandle);
   unsigned char *buf = xmalloc(bs * SECTOR);
   uint64_t sector, bytes = 0, nextReport = BENCH_REPORT_BYTES;
   double t0 = now_seconds(), t;
   VixError err;

   memset(buf, app.fillValue, bs * SECTOR);
   for (sector = 0; sector < capacity; sector += bs) {
      uint64_t n = capacity - sector < bs ? capacity - sector : bs;

      if (writing) {
         err = VixDiskLib_Write(app.diskHandle, sector, n, buf);
      } else {
         err = VixDiskLib_Read(app.diskHandle, sector, n, buf);
      }
      if (VIX_FAILED(err)) {
         free(buf);
         fail(err, writing ? "VixDiskLib_Write" : "VixDiskLib_Read", __LINE__);
      }
      bytes += n * SECTOR;
      if (bytes >= nextReport) {
         t = now_seconds() - t0;
         fprintf(stderr, "%s: %" PRIu64 " MiB, %.2f MiB/s\n", name,
                 bytes >> 20, t > 0 ? (double)bytes / 1048576.0 / t : 0);
         nextReport += BENCH_REPORT_BYTES;
      }
   }
   if (writing) {
      CHECK(VixDiskLib_Flush(app.diskHandle));
   }
   t = now_seconds() - t0;
   free(buf);
   bench_report(name, bytes, t);
}

/*
 * Async benchmark: a pool of buffers, each busy from its ReadAsync/WriteAsync
 * until its completion callback, which may run on a library thread and even
 * before the call returns.
 */
static struct {
   pthread_mutex_t lock;
   pthread_cond_t cond;
   char busy[ASYNC_POOL_SIZE];
   int inFlight;
   uint64_t completed;
   VixError firstError;
} aio = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, { 0 }, 0, 0,
          VIX_OK };

static void
AioCompletion(void *cbData, VixError result)
{
   char *busy = cbData;

   pthread_mutex_lock(&aio.lock);
   *busy = 0;
   aio.inFlight--;
   aio.completed++;
   if (result != VIX_OK && aio.firstError == VIX_OK) {
      aio.firstError = result;
   }
   pthread_cond_signal(&aio.cond);
   pthread_mutex_unlock(&aio.lock);
}

static void
DoAsyncBench(int writing)
{
   const char *name = writing ? "writeasyncbench" : "readasyncbench";
   uint64_t bs = app.bufSectors != 0 ? app.bufSectors : 128;
   VixDiskLibSectorType capacity = disk_capacity(app.diskHandle);
   unsigned char *pool = xmalloc(ASYNC_POOL_SIZE * bs * SECTOR);
   uint64_t sector, bytes = 0, issued = 0;
   double t0 = now_seconds();
   VixError err;

   memset(pool, app.fillValue, ASYNC_POOL_SIZE * bs * SECTOR);
   for (sector = 0; sector < capacity; sector += bs) {
      uint64_t n = capacity - sector < bs ? capacity - sector : bs;
      int slot = -1, k;

      pthread_mutex_lock(&aio.lock);
      while (slot < 0) {
         for (k = 0; k < ASYNC_POOL_SIZE; k++) {
            if (!aio.busy[k]) {
               slot = k;
               break;
            }
         }
         if (slot < 0) {
            pthread_cond_wait(&aio.cond, &aio.lock);
         }
      }
      aio.busy[slot] = 1;
      aio.inFlight++;
      pthread_mutex_unlock(&aio.lock);

      if (writing) {
         err = VixDiskLib_WriteAsync(app.diskHandle, sector, n,
                                     pool + (size_t)slot * bs * SECTOR,
                                     AioCompletion, &aio.busy[slot]);
      } else {
         err = VixDiskLib_ReadAsync(app.diskHandle, sector, n,
                                    pool + (size_t)slot * bs * SECTOR,
                                    AioCompletion, &aio.busy[slot]);
      }
      if (err != VIX_ASYNC) {
         /* Not queued: the callback will not run. */
         VixDiskLib_Wait(app.diskHandle);
         free(pool);
         fail(err, writing ? "VixDiskLib_WriteAsync" : "VixDiskLib_ReadAsync",
              __LINE__);
      }
      issued++;
      bytes += n * SECTOR;
   }
   err = VixDiskLib_Wait(app.diskHandle);
   free(pool);
   if (VIX_FAILED(err)) {
      fail(err, "VixDiskLib_Wait", __LINE__);
   }
   pthread_mutex_lock(&aio.lock);
   if (aio.completed != issued || aio.inFlight != 0) {
      uint64_t completed = aio.completed;
      pthread_mutex_unlock(&aio.lock);
      die("%s: %" PRIu64 " requests issued but %" PRIu64
          " completed after VixDiskLib_Wait", name, issued, completed);
   }
   pthread_mutex_unlock(&aio.lock);
   if (aio.firstError != VIX_OK) {
      fail(aio.firstError, "asynchronous I/O", __LINE__);
   }
   if (writing) {
      CHECK(VixDiskLib_Flush(app.diskHandle));
   }
   bench_report(name, bytes, now_seconds() - t0);
}

static void
DoCheckRepair(void)
{
   CHECK(VixDiskLib_CheckRepair(app.connection, app.diskPath,
                                app.repair ? TRUE : FALSE));
   printf("check%s of %s: OK\n", app.repair ? " and repair" : "", app.diskPath);
}

static void
DoGetAllocatedBlocks(void)
{
   VixDiskLibSectorType capacity = disk_capacity(app.diskHandle);
   uint64_t chunkSize = app.chunkSize;
   uint64_t numChunk = capacity / chunkSize;
   uint64_t offset = 0, allocated = 0;
   VixDiskLibBlock *blocks = NULL;
   size_t numBlocks = 0, capBlocks = 0, i;

   while (numChunk > 0) {
      VixDiskLibBlockList *list = NULL;
      uint64_t n = numChunk < VIXDISKLIB_MAX_CHUNK_NUMBER
                      ? numChunk : VIXDISKLIB_MAX_CHUNK_NUMBER;
      VixError err;

      err = VixDiskLib_QueryAllocatedBlocks(app.diskHandle, offset,
                                            n * chunkSize, chunkSize, &list);
      if (VIX_FAILED(err)) {
         free(blocks);
         fail(err, "VixDiskLib_QueryAllocatedBlocks", __LINE__);
      }
      if (numBlocks + list->numBlocks + 1 > capBlocks) {
         VixDiskLibBlock *grown;

         capBlocks = (numBlocks + list->numBlocks + 1) * 2;
         grown = realloc(blocks, capBlocks * sizeof *blocks);
         if (grown == NULL) {
            free(blocks);
            VixDiskLib_FreeBlockList(list);
            die("out of memory");
         }
         blocks = grown;
      }
      for (i = 0; i < list->numBlocks; i++) {
         blocks[numBlocks++] = list->blocks[i];
      }
      CHECK(VixDiskLib_FreeBlockList(list));
      offset += n * chunkSize;
      numChunk -= n;
   }

   /* The unaligned tail cannot be queried: count it as allocated. */
   if (offset < capacity) {
      if (numBlocks + 1 > capBlocks) {
         VixDiskLibBlock *grown = realloc(blocks, (numBlocks + 1) * sizeof *blocks);
         if (grown == NULL) {
            free(blocks);
            die("out of memory");
         }
         blocks = grown;
      }
      blocks[numBlocks].offset = offset;
      blocks[numBlocks].length = capacity - offset;
      numBlocks++;
   }

   printf("Number of blocks: %zu\n", numBlocks);
   printf("%-18s  %-18s\n", "Offset", "Length");
   for (i = 0; i < numBlocks; i++) {
      printf("0x%016" PRIx64 "  0x%016" PRIx64 "\n", (uint64_t)blocks[i].offset,
             (uint64_t)blocks[i].length);
      allocated += blocks[i].length;
   }
   printf("allocated: %" PRIu64 " of %" PRIu64 " sectors (%.2f%%)\n", allocated,
          (uint64_t)capacity,
          capacity != 0 ? 100.0 * (double)allocated / (double)capacity : 0.0);
   free(blocks);
}

/* ------------------------------------------------------------------------ */
/* Command line                                                              */
/* ------------------------------------------------------------------------ */

static void
usage(void)
{
   fprintf(stderr,
      "Usage: vixDiskLibSample command [options] diskPath\n"
      "\n"
      "Commands (exactly one):\n"
      " -create                  create a disk (-cap, -adapter, -type)\n"
      " -redo parentPath         create diskPath as a child (redo log) of parentPath\n"
      " -info                    print the disk's information\n"
      " -dump                    hex dump -count sectors from -start\n"
      " -fill                    write -count sectors from -start filled with -val\n"
      " -wmeta key value         write a metadata (DDB) entry\n"
      " -rmeta key               read a metadata entry\n"
      " -meta                    print all metadata entries\n"
      " -clone sourcePath        clone sourcePath into diskPath (-type, -adapter)\n"
      " -readbench blocksize     read the whole disk, blocksize sectors at a time\n"
      " -writebench blocksize    write the whole disk (destroys its data) with -val\n"
      " -readasyncbench blocksize   as -readbench with ReadAsync and Wait\n"
      " -writeasyncbench blocksize  as -writebench with WriteAsync and Wait\n"
      " -check repair            check the disk; repair it if repair is 1\n"
      " -getallocatedblocks      list allocated blocks (-chunksize)\n"
      "\n"
      "Options:\n"
      " -cap MB                  capacity for -create (default 100)\n"
      " -adapter ide|scsi|buslogic|lsilogic  adapter for -create/-clone (default scsi = BusLogic)\n"
      " -type N                  VixDiskLibDiskType for -create/-clone/-redo\n"
      "                          (1 monolithic sparse (default), 2 monolithic flat, 3 split sparse,\n"
      "                           4 split flat, 5 vmfs flat, 6 stream optimized, 7 vmfs thin,\n"
      "                           8 vmfs sparse)\n"
      " -hwversion N             virtual hardware version for -create/-clone (default 4)\n"
      " -lssize N / -pssize N    logical/physical sector size for -create/-clone\n"
      " -start N, -count N       first sector and sector count (default 0 and 1)\n"
      " -val N                   fill byte (default 255)\n"
      " -chunksize N             chunk size in sectors for -getallocatedblocks (default 128)\n"
      " -single                  open only this link (VIXDISKLIB_FLAG_OPEN_SINGLE_LINK)\n"
      " -readonly                open read-only (VIXDISKLIB_FLAG_OPEN_READ_ONLY)\n"
      " -unbuffered              VIXDISKLIB_FLAG_OPEN_UNBUFFERED\n"
      " -libdir dir              libDir for VixDiskLib_InitEx\n"
      " -initex configfile       configFile for VixDiskLib_InitEx\n"
      " -init                    use the deprecated VixDiskLib_Init instead of InitEx\n"
      " -connectex               connect with AllocateConnectParams + ConnectEx\n"
      " -mode modes              transport modes for ConnectEx (implies -connectex)\n"
      " -q                       do not print the library's log messages\n"
      "\n"
      "Remote disks (diskPath is then the server's name for the disk; implies -connectex):\n"
      " -host hostname           server: a host, unix:/path/to/socket or an NBD URI\n"
      " -port N                  port (default 10809 here, 443 for vCenter)\n"
      " -nfchostport N           port of the host's data service (NBD: preferred over -port)\n"
      " -thumb xx:xx:...         SHA-1 or SHA-256 thumbprint of the server certificate\n"
      " -user name, -password pw user name and password (VIXDISKLIB_CRED_UID)\n"
      " -vm moref=vm-N           vmxSpec of the virtual machine\n"
      " -ssmoref moref           snapshot reference for ConnectEx\n");
}

static uint64_t
parse_number(const char *opt, const char *s)
{
   char *end;
   unsigned long long v;

   if (s == NULL) {
      usage();
      fprintf(stderr, "Error: %s needs a value\n", opt);
      exit(1);
   }
   errno = 0;
   v = strtoull(s, &end, 0);
   if (errno != 0 || end == s || *end != '\0' || s[0] == '-') {
      fprintf(stderr, "Error: %s: invalid number '%s'\n", opt, s);
      exit(1);
   }
   return v;
}

static const char *
need_arg(int argc, char **argv, int i)
{
   if (i + 1 >= argc) {
      usage();
      fprintf(stderr, "Error: %s needs an argument\n", argv[i]);
      exit(1);
   }
   return argv[i + 1];
}

static void
set_command(enum command cmd, const char *name)
{
   if (app.command != CMD_NONE) {
      usage();
      fprintf(stderr, "Error: only one command may be given (%s)\n", name);
      exit(1);
   }
   app.command = cmd;
}

static void
parse_arguments(int argc, char **argv)
{
   int i;

   app.start = 0;
   app.count = 1;
   app.fillValue = 0xff;
   app.mbSize = 100;
   app.adapterType = VIXDISKLIB_ADAPTER_SCSI_BUSLOGIC;
   app.diskType = VIXDISKLIB_DISK_MONOLITHIC_SPARSE;
   app.hwVersion = VIXDISKLIB_HWVERSION_WORKSTATION_5;
   app.chunkSize = VIXDISKLIB_MIN_CHUNK_SIZE;

   for (i = 1; i < argc; i++) {
      const char *a = argv[i];

      if (!strcmp(a, "-create")) {
         set_command(CMD_CREATE, a);
      } else if (!strcmp(a, "-redo")) {
         set_command(CMD_REDO, a);
         app.parentPath = need_arg(argc, argv, i++);
      } else if (!strcmp(a, "-info")) {
         set_command(CMD_INFO, a);
      } else if (!strcmp(a, "-dump")) {
         set_command(CMD_DUMP, a);
      } else if (!strcmp(a, "-fill")) {
         set_command(CMD_FILL, a);
      } else if (!strcmp(a, "-wmeta")) {
         set_command(CMD_WMETA, a);
         app.metaKey = need_arg(argc, argv, i++);
         app.metaVal = need_arg(argc, argv, i++);
      } else if (!strcmp(a, "-rmeta")) {
         set_command(CMD_RMETA, a);
         app.metaKey = need_arg(argc, argv, i++);
      } else if (!strcmp(a, "-meta")) {
         set_command(CMD_META, a);
      } else if (!strcmp(a, "-clone")) {
         set_command(CMD_CLONE, a);
         app.srcPath = need_arg(argc, argv, i++);
      } else if (!strcmp(a, "-readbench")) {
         set_command(CMD_READBENCH, a);
         app.bufSectors = parse_number(a, need_arg(argc, argv, i++));
      } else if (!strcmp(a, "-writebench")) {
         set_command(CMD_WRITEBENCH, a);
         app.bufSectors = parse_number(a, need_arg(argc, argv, i++));
      } else if (!strcmp(a, "-readasyncbench")) {
         set_command(CMD_READASYNCBENCH, a);
         app.bufSectors = parse_number(a, need_arg(argc, argv, i++));
      } else if (!strcmp(a, "-writeasyncbench")) {
         set_command(CMD_WRITEASYNCBENCH, a);
         app.bufSectors = parse_number(a, need_arg(argc, argv, i++));
      } else if (!strcmp(a, "-check")) {
         set_command(CMD_CHECKREPAIR, a);
         app.repair = parse_number(a, need_arg(argc, argv, i++)) != 0;
      } else if (!strcmp(a, "-getallocatedblocks")) {
         set_command(CMD_GETALLOCATEDBLOCKS, a);
      } else if (!strcmp(a, "-cap")) {
         app.mbSize = parse_number(a, need_arg(argc, argv, i++));
         app.capGiven = 1;
      } else if (!strcmp(a, "-adapter")) {
         const char *v = need_arg(argc, argv, i++);
         if (!strcmp(v, "ide")) {
            app.adapterType = VIXDISKLIB_ADAPTER_IDE;
         } else if (!strcmp(v, "scsi") || !strcmp(v, "buslogic")) {
            app.adapterType = VIXDISKLIB_ADAPTER_SCSI_BUSLOGIC;
         } else if (!strcmp(v, "lsilogic")) {
            app.adapterType = VIXDISKLIB_ADAPTER_SCSI_LSILOGIC;
         } else {
            fprintf(stderr, "Error: unknown adapter '%s'\n", v);
            exit(1);
         }
      } else if (!strcmp(a, "-type")) {
         app.diskType = (VixDiskLibDiskType)parse_number(a, need_arg(argc, argv, i++));
         app.typeGiven = 1;
      } else if (!strcmp(a, "-hwversion")) {
         app.hwVersion = (uint16_t)parse_number(a, need_arg(argc, argv, i++));
      } else if (!strcmp(a, "-lssize")) {
         app.logicalSectorSize = (uint32_t)parse_number(a, need_arg(argc, argv, i++));
      } else if (!strcmp(a, "-pssize")) {
         app.physicalSectorSize = (uint32_t)parse_number(a, need_arg(argc, argv, i++));
      } else if (!strcmp(a, "-start")) {
         app.start = parse_number(a, need_arg(argc, argv, i++));
      } else if (!strcmp(a, "-count")) {
         app.count = parse_number(a, need_arg(argc, argv, i++));
      } else if (!strcmp(a, "-val")) {
         app.fillValue = (int)(parse_number(a, need_arg(argc, argv, i++)) & 0xff);
      } else if (!strcmp(a, "-chunksize")) {
         app.chunkSize = parse_number(a, need_arg(argc, argv, i++));
      } else if (!strcmp(a, "-single")) {
         app.openFlags |= VIXDISKLIB_FLAG_OPEN_SINGLE_LINK;
      } else if (!strcmp(a, "-readonly")) {
         app.openFlags |= VIXDISKLIB_FLAG_OPEN_READ_ONLY;
      } else if (!strcmp(a, "-unbuffered")) {
         app.openFlags |= VIXDISKLIB_FLAG_OPEN_UNBUFFERED;
      } else if (!strcmp(a, "-libdir")) {
         app.libdir = need_arg(argc, argv, i++);
      } else if (!strcmp(a, "-initex")) {
         app.cfgFile = need_arg(argc, argv, i++);
      } else if (!strcmp(a, "-init")) {
         app.useInit = 1;
      } else if (!strcmp(a, "-connectex")) {
         app.useConnectEx = 1;
      } else if (!strcmp(a, "-mode")) {
         app.modes = need_arg(argc, argv, i++);
         app.useConnectEx = 1;
      } else if (!strcmp(a, "-q")) {
         app.quiet = 1;
      } else if (!strcmp(a, "-host")) {
         app.host = need_arg(argc, argv, i++);
         app.useConnectEx = 1;
      } else if (!strcmp(a, "-user")) {
         app.user = need_arg(argc, argv, i++);
      } else if (!strcmp(a, "-password")) {
         app.password = need_arg(argc, argv, i++);
      } else if (!strcmp(a, "-vm")) {
         app.vmxSpec = need_arg(argc, argv, i++);
      } else if (!strcmp(a, "-thumb")) {
         app.thumbPrint = need_arg(argc, argv, i++);
      } else if (!strcmp(a, "-ssmoref")) {
         app.ssMoref = need_arg(argc, argv, i++);
      } else if (!strcmp(a, "-port")) {
         app.port = (uint32_t)parse_number(a, need_arg(argc, argv, i++));
      } else if (!strcmp(a, "-nfchostport")) {
         app.nfcHostPort = (uint32_t)parse_number(a, need_arg(argc, argv, i++));
      } else if (a[0] == '-' && a[1] != '\0') {
         usage();
         fprintf(stderr, "Error: unknown option %s\n", a);
         exit(1);
      } else if (app.diskPath == NULL) {
         app.diskPath = a;
      } else {
         usage();
         fprintf(stderr, "Error: only one diskPath may be given (%s)\n", a);
         exit(1);
      }
   }

   if (app.command == CMD_NONE || app.diskPath == NULL) {
      usage();
      exit(1);
   }
   if (app.chunkSize < VIXDISKLIB_MIN_CHUNK_SIZE ||
       app.chunkSize > VIXDISKLIB_MAX_CHUNK_SIZE) {
      fprintf(stderr, "Error: -chunksize must be in [%d, %d]\n",
              VIXDISKLIB_MIN_CHUNK_SIZE, VIXDISKLIB_MAX_CHUNK_SIZE);
      exit(1);
   }
   if (app.mbSize == 0 || app.mbSize > (UINT64_MAX >> 12)) {
      fprintf(stderr, "Error: -cap out of range\n");
      exit(1);
   }
}

/* Commands that only read open the disk read-only. */
static int
command_is_read_only(enum command cmd)
{
   switch (cmd) {
   case CMD_INFO:
   case CMD_DUMP:
   case CMD_RMETA:
   case CMD_META:
   case CMD_READBENCH:
   case CMD_READASYNCBENCH:
   case CMD_GETALLOCATEDBLOCKS:
      return 1;
   default:
      return 0;
   }
}

/* Commands that work on an open handle of diskPath. */
static int
command_opens_disk(enum command cmd)
{
   switch (cmd) {
   case CMD_CREATE:
   case CMD_REDO:
   case CMD_CLONE:
   case CMD_CHECKREPAIR:
      return 0;
   default:
      return 1;
   }
}

static void
cleanup(void)
{
   if (app.diskHandle != NULL) {
      VixError err = VixDiskLib_Close(app.diskHandle);
      app.diskHandle = NULL;
      if (VIX_FAILED(err)) {
         fprintf(stderr, "Error: VixDiskLib_Close failed (VixError %" PRIu64 ")\n",
                 (uint64_t)err);
      }
   }
   if (app.connection != NULL) {
      VixDiskLib_Disconnect(app.connection);
      app.connection = NULL;
   }
   if (app.accessPrepared) {
      app.accessPrepared = 0;
      VixDiskLib_EndAccess(app.allocatedParams, "vixDiskLibSample");
   }
   if (app.allocatedParams != NULL) {
      VixDiskLib_FreeConnectParams(app.allocatedParams);
      app.allocatedParams = NULL;
   }
   if (app.initialized) {
      app.initialized = 0;
      VixDiskLib_Exit();
   }
}

int
main(int argc, char **argv)
{
   VixDiskLibConnectParams params;
   VixError err;

   parse_arguments(argc, argv);

   if (app.useInit) {
      err = VixDiskLib_Init(SAMPLE_VERSION_MAJOR, SAMPLE_VERSION_MINOR,
                            &LogFunc, &WarnFunc, &PanicFunc, app.libdir);
   } else {
      err = VixDiskLib_InitEx(SAMPLE_VERSION_MAJOR, SAMPLE_VERSION_MINOR,
                              &LogFunc, &WarnFunc, &PanicFunc, app.libdir,
                              app.cfgFile);
   }
   if (VIX_FAILED(err)) {
      fail(err, app.useInit ? "VixDiskLib_Init" : "VixDiskLib_InitEx", __LINE__);
   }
   app.initialized = 1;

   /* Local files: zeroed connect params, serverName NULL; remote: -host. */
   if (app.useConnectEx) {
      VixDiskLibConnectParams *p = VixDiskLib_AllocateConnectParams();

      if (p == NULL) {
         die("VixDiskLib_AllocateConnectParams returned NULL");
      }
      app.allocatedParams = p;
      if (app.host != NULL) {
         /* The strings stay the caller's: FreeConnectParams does not free them. */
         p->serverName = (char *)app.host;
         p->thumbPrint = (char *)app.thumbPrint;
         p->vmxSpec = (char *)app.vmxSpec;
         p->port = app.port;
         p->nfcHostPort = app.nfcHostPort;
         if (app.user != NULL) {
            p->credType = VIXDISKLIB_CRED_UID;
            p->creds.uid.userName = (char *)app.user;
            p->creds.uid.password = (char *)app.password;
         }
         /* As VMware's sample: around the access to a VM's disks. */
         CHECK(VixDiskLib_PrepareForAccess(p, "vixDiskLibSample"));
         app.accessPrepared = 1;
      }
      CHECK(VixDiskLib_ConnectEx(p,
                                 command_is_read_only(app.command) ? TRUE : FALSE,
                                 app.ssMoref, app.modes, &app.connection));
   } else {
      memset(&params, 0, sizeof params);
      CHECK(VixDiskLib_Connect(&params, &app.connection));
   }

   if (command_opens_disk(app.command)) {
      uint32_t flags = app.openFlags;
      if (command_is_read_only(app.command)) {
         flags |= VIXDISKLIB_FLAG_OPEN_READ_ONLY;
      }
      open_disk(app.diskPath, flags, &app.diskHandle);
   }

   switch (app.command) {
   case CMD_CREATE:
      DoCreate();
      break;
   case CMD_REDO:
      DoRedo();
      break;
   case CMD_INFO:
      DoInfo();
      break;
   case CMD_DUMP:
      DoDump();
      break;
   case CMD_FILL:
      DoFill();
      break;
   case CMD_WMETA:
      DoWriteMeta();
      break;
   case CMD_RMETA:
      DoReadMeta();
      break;
   case CMD_META:
      DoMeta();
      break;
   case CMD_CLONE:
      DoClone();
      break;
   case CMD_READBENCH:
      DoBench(0);
      break;
   case CMD_WRITEBENCH:
      DoBench(1);
      break;
   case CMD_READASYNCBENCH:
      DoAsyncBench(0);
      break;
   case CMD_WRITEASYNCBENCH:
      DoAsyncBench(1);
      break;
   case CMD_CHECKREPAIR:
      DoCheckRepair();
      break;
   case CMD_GETALLOCATEDBLOCKS:
      DoGetAllocatedBlocks();
      break;
   case CMD_NONE:
      break;
   }

   if (app.diskHandle != NULL) {
      err = VixDiskLib_Close(app.diskHandle);
      app.diskHandle = NULL;
      if (VIX_FAILED(err)) {
         fail(err, "VixDiskLib_Close", __LINE__);
      }
   }
   if (app.connection != NULL) {
      err = VixDiskLib_Disconnect(app.connection);
      app.connection = NULL;
      if (VIX_FAILED(err)) {
         fail(err, "VixDiskLib_Disconnect", __LINE__);
      }
   }
   cleanup();
   return 0;
}
