/*
 * vixMntapiSample.c - a C sample for libvixMntapi, in the manner of the -mount
 * command of VMware's VDDK sample (vix-mntapi-sample): it opens one disk as a
 * disk set, lists its volumes, mounts each one, shows where and what is in it,
 * finds the operating system, and dismounts. Written against the documented
 * VDDK API only (vixDiskLib.h and vixMntapi.h); mounting needs root.
 *
 *   vixMntapiSample [options] diskPath
 *
 * Run it without arguments for the options; README.md beside it has examples.
 */

#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vixDiskLib.h"
#include "vixMntapi.h"

/* The header defines no version macros for VixDiskLib; the samples define theirs. */
#define SAMPLE_DISKLIB_MAJOR 8
#define SAMPLE_DISKLIB_MINOR 0
#define MAX_COPIES 8

struct copy {
   const char *inVolume;   /* path relative to the volume's root */
   const char *local;      /* path on this machine */
};

static struct {
   const char *diskPath;
   const char *libdir;
   const char *cfgFile;
   int readWrite;           /* -rw */
   size_t onlyVolume;       /* -volume N (1-based); 0: all */
   size_t numberOfDisks;    /* -disks N */
   int useOpenDiskSet;      /* -opendiskset */
   int osInfo;              /* not -noosinfo */
   int busy;                /* -busy */
   int quiet;               /* -q */
   struct copy copyOut[MAX_COPIES];
   size_t numCopyOut;
   struct copy copyIn[MAX_COPIES];
   size_t numCopyIn;

   /* State, released by cleanup(). */
   int diskLibInitialized;
   int mntapiInitialized;
   VixDiskLibConnection connection;
   VixDiskLibHandle diskHandle;     /* -opendiskset */
   VixDiskSetHandle diskSet;
   VixVolumeHandle *volumes;
   size_t numVolumes;
} app;

static void cleanup(void);

/* ------------------------------------------------------------------------ */
/* Errors and callbacks                                                      */
/* ------------------------------------------------------------------------ */

/* The library's text for err, in buf. */
static const char *
error_text(VixError err, char *buf, size_t size)
{
   char *text = VixDiskLib_GetErrorText(err, NULL);

   snprintf(buf, size, "%s (VixError %" PRIu64 ")",
            text != NULL ? text : "(no error text)", (uint64_t)err);
   VixDiskLib_FreeErrorText(text);
   return buf;
}

/* Prints the library's text for err and exits with status 1. */
static void
fail(VixError err, const char *what, int line)
{
   char buf[512];

   fprintf(stderr, "Error: %s failed at line %d: %s\n", what, line,
           error_text(err, buf, sizeof buf));
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

/* ------------------------------------------------------------------------ */
/* Files in a mounted volume                                                 */
/* ------------------------------------------------------------------------ */

static int
compare_names(const void *a, const void *b)
{
   return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Prints the names in the top folder of a mounted volume, sorted. */
static void
list_folder(size_t index, const char *dir)
{
   DIR *d = opendir(dir);
   struct dirent *e;
   char **names = NULL;
   size_t n = 0, cap = 0, i;

   if (d == NULL) {
      die("cannot list %s: %s", dir, strerror(errno));
   }
   while ((e = readdir(d)) != NULL) {
      if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) {
         continue;
      }
      if (n == cap) {
         char **grown;

         cap = cap != 0 ? 2 * cap : 16;
         grown = realloc(names, cap * sizeof *names);
         if (grown == NULL) {
            closedir(d);
            die("out of memory");
         }
         names = grown;
      }
      names[n] = strdup(e->d_name);
      if (names[n] == NULL) {
         closedir(d);
         die("out of memory");
      }
      n++;
   }
   closedir(d);
   qsort(names, n, sizeof *names, compare_names);
   printf("volume %zu: entries:", index);
   for (i = 0; i < n; i++) {
      printf(" %s", names[i]);
      free(names[i]);
   }
   printf("\n");
   free(names);
}

/* Copies the file src to dst (created or truncated). */
static void
copy_file(const char *src, const char *dst)
{
   char buf[65536];
   size_t n;
   FILE *in = fopen(src, "rb");
   FILE *out;

   if (in == NULL) {
      die("cannot open %s: %s", src, strerror(errno));
   }
   out = fopen(dst, "wb");
   if (out == NULL) {
      fclose(in);
      die("cannot create %s: %s", dst, strerror(errno));
   }
   while ((n = fread(buf, 1, sizeof buf, in)) > 0) {
      if (fwrite(buf, 1, n, out) != n) {
         fclose(in);
         fclose(out);
         die("cannot write %s: %s", dst, strerror(errno));
      }
   }
   if (ferror(in)) {
      fclose(in);
      fclose(out);
      die("cannot read %s", src);
   }
   fclose(in);
   if (fclose(out) != 0) {
      die("cannot write %s: %s", dst, strerror(errno));
   }
}

static char *
join(const char *dir, const char *name)
{
   size_t n = strlen(dir) + strlen(name) + 2;
   char *p = malloc(n);

   if (p == NULL) {
      die("out of memory");
   }
   snprintf(p, n, "%s/%s", dir, name);
   return p;
}

/* -copyout and -copyin for the volume mounted on dir. */
static void
copy_files(size_t index, const char *dir)
{
   size_t i;

   for (i = 0; i < app.numCopyOut; i++) {
      char *src = join(dir, app.copyOut[i].inVolume);

      copy_file(src, app.copyOut[i].local);
      printf("volume %zu: copied %s to %s\n", index, app.copyOut[i].inVolume,
             app.copyOut[i].local);
      free(src);
   }
   for (i = 0; i < app.numCopyIn; i++) {
      char *dst = join(dir, app.copyIn[i].inVolume);

      copy_file(app.copyIn[i].local, dst);
      printf("volume %zu: copied %s to %s\n", index, app.copyIn[i].local,
             app.copyIn[i].inVolume);
      free(dst);
   }
}

/* ------------------------------------------------------------------------ */
/* The mount sequence                                                        */
/* ------------------------------------------------------------------------ */

static const char *
volume_type_name(VixVolumeType type)
{
   switch (type) {
   case VIXMNTAPI_BASIC_PARTITION:
      return "BASIC_PARTITION";
   case VIXMNTAPI_GPT_PARTITION:
      return "GPT_PARTITION";
   case VIXMNTAPI_DYNAMIC_VOLUME:
      return "DYNAMIC_VOLUME";
   case VIXMNTAPI_LVM_VOLUME:
      return "LVM_VOLUME";
   default:
      return "UNKNOWN_VOLTYPE";
   }
}

static const char *
os_family_name(VixOsFamily family)
{
   switch (family) {
   case VIXMNTAPI_NO_OS:
      return "NO_OS";
   case VIXMNTAPI_WINDOWS:
      return "WINDOWS";
   case VIXMNTAPI_OTHER:
      return "OTHER";
   default:
      return "unknown";
   }
}

static void
open_disk_set(void)
{
   size_t i;

   if (app.useOpenDiskSet) {
      VixDiskLibHandle handles[MAX_COPIES];

      CHECK(VixDiskLib_Open(app.connection, app.diskPath,
                            VIXDISKLIB_FLAG_OPEN_READ_ONLY, &app.diskHandle));
      for (i = 0; i < app.numberOfDisks; i++) {
         handles[i] = app.diskHandle;
      }
      CHECK(VixMntapi_OpenDiskSet(handles, app.numberOfDisks,
                                  VIXDISKLIB_FLAG_OPEN_READ_ONLY, &app.diskSet));
   } else {
      const char *names[MAX_COPIES];

      for (i = 0; i < app.numberOfDisks; i++) {
         names[i] = app.diskPath;
      }
      CHECK(VixMntapi_OpenDisks(app.connection, names, app.numberOfDisks,
                                app.readWrite ? 0 : VIXDISKLIB_FLAG_OPEN_READ_ONLY,
                                &app.diskSet));
   }
}

/* Prints what GetVolumeInfo says; returns whether the volume is mounted. */
static int
show_volume(size_t index, VixVolumeHandle volume, char *link, size_t linkSize)
{
   VixVolumeInfo *info = NULL;
   int mounted;

   CHECK(VixMntapi_GetVolumeInfo(volume, &info));
   mounted = info->isMounted != 0;
   printf("volume %zu: type=%s isMounted=%d symbolicLink=%s numGuestMountPoints=%zu\n",
          index, volume_type_name(info->type), mounted,
          info->symbolicLink != NULL ? info->symbolicLink : "(none)",
          info->numGuestMountPoints);
   if (link != NULL) {
      snprintf(link, linkSize, "%s", info->symbolicLink != NULL ? info->symbolicLink : "");
   }
   VixMntapi_FreeVolumeInfo(info);
   return mounted;
}

static void
show_os(void)
{
   VixOsInfo *os = NULL;
   VixError err = VixMntapi_GetOsInfo(app.diskSet, &os);
   char buf[512];

   if (VIX_FAILED(err)) {
      printf("os: not found: %s\n", error_text(err, buf, sizeof buf));
      return;
   }
   printf("os: family=%s(%u) version=%u.%u 64bit=%d vendor=\"%s\" edition=\"%s\" "
          "osFolder=%s\n",
          os_family_name(os->family), (unsigned)os->family,
          (unsigned)os->majorVersion, (unsigned)os->minorVersion,
          os->osIs64Bit != 0, os->vendor, os->edition, os->osFolder);
   VixMntapi_FreeOsInfo(os);
}

/* Holds the mounted volume's root open: a plain dismount must refuse, a forced
 * one must succeed. */
static void
dismount_busy(size_t index, VixVolumeHandle volume, const char *link)
{
   char buf[512];
   int fd = open(link, O_RDONLY | O_DIRECTORY);
   VixError err;

   if (fd < 0) {
      die("cannot open %s: %s", link, strerror(errno));
   }
   err = VixMntapi_DismountVolume(volume, FALSE);
   if (err != VIX_E_MNTAPI_OPEN_HANDLES) {
      close(fd);
      die("volume %zu: a dismount with a file open gave %s, expected "
          "VIX_E_MNTAPI_OPEN_HANDLES", index, error_text(err, buf, sizeof buf));
   }
   printf("volume %zu: busy: %s\n", index, error_text(err, buf, sizeof buf));
   err = VixMntapi_DismountVolume(volume, TRUE);
   close(fd);
   if (VIX_FAILED(err)) {
      fail(err, "VixMntapi_DismountVolume(force)", __LINE__);
   }
   printf("volume %zu: dismounted (forced)\n", index);
}

static int
run(void)
{
   VixDiskLibConnectParams params;
   VixDiskSetInfo *setInfo = NULL;
   char *mounted;
   char link[4096];
   char buf[512];
   size_t i, numMounted = 0;
   int copied = 0;

   CHECK(VixDiskLib_InitEx(SAMPLE_DISKLIB_MAJOR, SAMPLE_DISKLIB_MINOR, LogFunc,
                           WarnFunc, PanicFunc, app.libdir, app.cfgFile));
   app.diskLibInitialized = 1;
   CHECK(VixMntapi_Init(VIXMNTAPI_MAJOR_VERSION, VIXMNTAPI_MINOR_VERSION, LogFunc,
                        WarnFunc, PanicFunc, app.libdir, app.cfgFile));
   app.mntapiInitialized = 1;
   memset(&params, 0, sizeof params);
   CHECK(VixDiskLib_Connect(&params, &app.connection));

   open_disk_set();
   CHECK(VixMntapi_GetDiskSetInfo(app.diskSet, &setInfo));
   printf("disk set: openFlags=%u mountPath=%s\n", (unsigned)setInfo->openFlags,
          setInfo->mountPath);
   VixMntapi_FreeDiskSetInfo(setInfo);

   CHECK(VixMntapi_GetVolumeHandles(app.diskSet, &app.numVolumes, &app.volumes));
   printf("volumes: %zu\n", app.numVolumes);
   if (app.onlyVolume > app.numVolumes) {
      die("-volume %zu: the disk has %zu volume(s)", app.onlyVolume, app.numVolumes);
   }
   mounted = calloc(app.numVolumes + 1, 1);
   if (mounted == NULL) {
      die("out of memory");
   }

   for (i = 0; i < app.numVolumes; i++) {
      size_t index = i + 1;
      VixError err;

      if (app.onlyVolume != 0 && index != app.onlyVolume) {
         continue;
      }
      show_volume(index, app.volumes[i], NULL, 0);
      err = VixMntapi_MountVolume(app.volumes[i], app.readWrite ? FALSE : TRUE);
      if (VIX_FAILED(err)) {
         printf("volume %zu: cannot mount: %s\n", index, error_text(err, buf, sizeof buf));
         if (app.onlyVolume != 0) {
            free(mounted);
            fail(err, "VixMntapi_MountVolume", __LINE__);
         }
         continue;
      }
      mounted[i] = 1;
      numMounted++;
      printf("volume %zu: mounted (%s)\n", index, app.readWrite ? "read-write" : "read-only");
      /* VMware's sample tolerates this answer to a second mount. */
      err = VixMntapi_MountVolume(app.volumes[i], TRUE);
      if (err != VIX_E_MNTAPI_VOLUME_ALREADY_MOUNTED) {
         free(mounted);
         die("volume %zu: a second mount gave %s, expected "
             "VIX_E_MNTAPI_VOLUME_ALREADY_MOUNTED", index, error_text(err, buf, sizeof buf));
      }
      if (!show_volume(index, app.volumes[i], link, sizeof link)) {
         free(mounted);
         die("volume %zu: GetVolumeInfo says it is not mounted", index);
      }
      list_folder(index, link);
      if (!copied) {
         copy_files(index, link);
         copied = 1;
      }
   }

   if (app.osInfo) {
      show_os();
   }

   for (i = 0; i < app.numVolumes; i++) {
      size_t index = i + 1;

      if (!mounted[i]) {
         if (show_volume(index, app.volumes[i], NULL, 0)) {
            printf("volume %zu: left mounted by GetOsInfo (CloseDiskSet dismounts it)\n",
                   index);
         }
         continue;
      }
      if (app.busy) {
         show_volume(index, app.volumes[i], link, sizeof link);
         dismount_busy(index, app.volumes[i], link);
      } else {
         CHECK(VixMntapi_DismountVolume(app.volumes[i], FALSE));
         printf("volume %zu: dismounted\n", index);
      }
      if (show_volume(index, app.volumes[i], NULL, 0)) {
         free(mounted);
         die("volume %zu: still mounted after DismountVolume", index);
      }
   }
   free(mounted);
   cleanup();
   if (app.numVolumes > 0 && numMounted == 0) {
      fprintf(stderr, "Error: no volume could be mounted\n");
      return 1;
   }
   return 0;
}

/* Releases everything in the documented order; safe to call more than once. */
static void
cleanup(void)
{
   if (app.volumes != NULL) {
      VixMntapi_FreeVolumeHandles(app.volumes);
      app.volumes = NULL;
   }
   if (app.diskSet != NULL) {
      VixError err = VixMntapi_CloseDiskSet(app.diskSet);
      char buf[512];

      if (VIX_FAILED(err)) {
         fprintf(stderr, "Error: VixMntapi_CloseDiskSet: %s\n",
                 error_text(err, buf, sizeof buf));
      }
      app.diskSet = NULL;
   }
   if (app.diskHandle != NULL) {
      VixDiskLib_Close(app.diskHandle);
      app.diskHandle = NULL;
   }
   if (app.connection != NULL) {
      VixDiskLib_Disconnect(app.connection);
      app.connection = NULL;
   }
   if (app.mntapiInitialized) {
      VixMntapi_Exit();
      app.mntapiInitialized = 0;
   }
   if (app.diskLibInitialized) {
      VixDiskLib_Exit();
      app.diskLibInitialized = 0;
   }
}

/* ------------------------------------------------------------------------ */
/* Command line                                                              */
/* ------------------------------------------------------------------------ */

static void
usage(void)
{
   fprintf(stderr,
      "Usage: vixMntapiSample [options] diskPath\n"
      "Opens diskPath as a disk set (VixMntapi_OpenDisks), lists its volumes,\n"
      "mounts each (read-only unless -rw), prints its folder and top entries,\n"
      "finds the operating system (VixMntapi_GetOsInfo) and dismounts.\n"
      "Mounting needs root.\n\n"
      "Options:\n"
      "  -rw                   open the set read-write and mount read-write\n"
      "  -volume N             only volume N (1-based, GetVolumeHandles order)\n"
      "  -copyout REL LOCAL    copy REL (relative to the first mounted volume) to LOCAL\n"
      "  -copyin LOCAL REL     copy LOCAL into the first mounted volume as REL (-rw)\n"
      "  -noosinfo             do not call VixMntapi_GetOsInfo\n"
      "  -busy                 dismount with the volume's root open: a plain\n"
      "                        dismount must fail (VIX_E_MNTAPI_OPEN_HANDLES), a\n"
      "                        forced one succeed\n"
      "  -opendiskset          VixDiskLib_Open (read-only) + VixMntapi_OpenDiskSet\n"
      "  -disks N              pass the disk N times (numberOfDisks; Linux takes 1)\n"
      "  -libdir DIR           libDir for both Init calls\n"
      "  -initex FILE          configuration file for both Init calls (tmpDirectory, ...)\n"
      "  -q                    do not print the libraries' log lines\n");
}

static size_t
parse_count(const char *s, const char *what)
{
   char *end;
   unsigned long v;

   errno = 0;
   v = strtoul(s, &end, 10);
   if (errno != 0 || *end != '\0' || end == s || v == 0 || v > MAX_COPIES) {
      fprintf(stderr, "Error: %s: expected a number from 1 to %d, got '%s'\n", what,
              MAX_COPIES, s);
      exit(1);
   }
   return (size_t)v;
}

static void
parse_args(int argc, char **argv)
{
   int i;

   app.numberOfDisks = 1;
   app.osInfo = 1;
   for (i = 1; i < argc; i++) {
      const char *a = argv[i];
      int more = argc - i - 1;

      if (strcmp(a, "-rw") == 0) {
         app.readWrite = 1;
      } else if (strcmp(a, "-volume") == 0 && more >= 1) {
         app.onlyVolume = parse_count(argv[++i], "-volume");
      } else if (strcmp(a, "-disks") == 0 && more >= 1) {
         app.numberOfDisks = parse_count(argv[++i], "-disks");
      } else if (strcmp(a, "-copyout") == 0 && more >= 2) {
         if (app.numCopyOut == MAX_COPIES) {
            fprintf(stderr, "Error: at most %d -copyout\n", MAX_COPIES);
            exit(1);
         }
         app.copyOut[app.numCopyOut].inVolume = argv[++i];
         app.copyOut[app.numCopyOut].local = argv[++i];
         app.numCopyOut++;
      } else if (strcmp(a, "-copyin") == 0 && more >= 2) {
         if (app.numCopyIn == MAX_COPIES) {
            fprintf(stderr, "Error: at most %d -copyin\n", MAX_COPIES);
            exit(1);
         }
         app.copyIn[app.numCopyIn].local = argv[++i];
         app.copyIn[app.numCopyIn].inVolume = argv[++i];
         app.numCopyIn++;
      } else if (strcmp(a, "-noosinfo") == 0) {
         app.osInfo = 0;
      } else if (strcmp(a, "-busy") == 0) {
         app.busy = 1;
      } else if (strcmp(a, "-opendiskset") == 0) {
         app.useOpenDiskSet = 1;
      } else if (strcmp(a, "-libdir") == 0 && more >= 1) {
         app.libdir = argv[++i];
      } else if (strcmp(a, "-initex") == 0 && more >= 1) {
         app.cfgFile = argv[++i];
      } else if (strcmp(a, "-q") == 0) {
         app.quiet = 1;
      } else if (a[0] == '-') {
         fprintf(stderr, "Error: unknown option or missing argument: %s\n", a);
         usage();
         exit(1);
      } else if (app.diskPath == NULL) {
         app.diskPath = a;
      } else {
         fprintf(stderr, "Error: more than one disk path: %s\n", a);
         exit(1);
      }
   }
   if (app.diskPath == NULL) {
      usage();
      exit(1);
   }
   if (app.numCopyIn > 0 && !app.readWrite) {
      fprintf(stderr, "Error: -copyin needs -rw\n");
      exit(1);
   }
   if (app.readWrite && app.useOpenDiskSet) {
      fprintf(stderr, "Error: -opendiskset sets are read-only: no -rw\n");
      exit(1);
   }
}

int
main(int argc, char **argv)
{
   parse_args(argc, argv);
   return run();
}
