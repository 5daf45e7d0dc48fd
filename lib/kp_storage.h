/* kp_storage: the file store under storage.root, written durably.
 *
 * Paths never come from client text: an instance lives at root/aa/bb/<h>.dcm where <h> is the
 * hex SHA-256 of its SOP Instance UID and aa, bb are the first two byte pairs of <h> (65,536
 * directories, no directory grows large). Received data first lands in root/.tmp/ (same file
 * system, so rename is atomic). A durable write is: write the temp file, fsync it, rename it into
 * place, fsync the directory (ARCHITECTURE section 3); the directory fsync can be deferred and
 * shared by a caller that commits many files at once (kp_storage_sync_dirs). */
#ifndef KP_STORAGE_H
#define KP_STORAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* "aa/bb/" + 64 hex + ".dcm" (or ".orig") + NUL */
#define KP_STORAGE_RELPATH_MAX 80

typedef struct kp_storage kp_storage_t;

/* Opens (creating when missing) the store at root. fsync_on false skips every fsync (tests of
 * logic only; never in production). NULL on failure (logged). Owned by the caller. */
kp_storage_t *kp_storage_new(const char *root, bool fsync_on);
/* Frees and clears *st; idempotent. */
void kp_storage_destroy(kp_storage_t **st);
/* Absolute root and temp directory (borrowed). */
const char *kp_storage_root(const kp_storage_t *st);
const char *kp_storage_tmpdir(const kp_storage_t *st);

/* Relative path of the instance with this SOP Instance UID (always succeeds for a non-NULL uid). */
void kp_storage_relpath(const char *sop_uid, char out[KP_STORAGE_RELPATH_MAX]);
/* Checks a relative path has exactly the shape kp_storage_relpath makes (no traversal). */
bool kp_storage_relpath_valid(const char *rel);
/* Absolute path of a relative one (malloc'd, caller frees). */
char *kp_storage_abspath(const kp_storage_t *st, const char *rel);

/* fsyncs a file by path. 0 or KP_EIO. */
int kp_storage_fsync_path(const kp_storage_t *st, const char *path);
/* Makes tmp_path (already in the temp dir) the file at rel: fsync file, create the parent
 * directories, rename. The directory fsync is done too unless defer_dir_sync is true, in which
 * case the caller must call kp_storage_sync_dir(rel) before acknowledging. 0 or KP_EIO. */
int kp_storage_commit(kp_storage_t *st, const char *tmp_path, const char *rel, bool defer_dir_sync);
/* fsyncs the parent directory of rel. 0 or KP_EIO. */
int kp_storage_sync_dir(kp_storage_t *st, const char *rel);
/* Durable write of a memory buffer to rel (temp file, fsync, rename, directory fsync). */
int kp_storage_write(kp_storage_t *st, const char *rel, const void *buf, size_t len);
/* Creates a new empty temp file in the temp dir; writes its path (malloc'd) to *path and returns
 * an open fd, or a negative code. */
int kp_storage_tmpfile(kp_storage_t *st, char **path);
/* SHA-256 (lower-case hex) and size of a file. 0 or KP_EIO. */
int kp_storage_sha256_file(const char *path, char hex[65], int64_t *size);
/* 1 when the two files have the same bytes, 0 when they differ, KP_EIO when one is unreadable. */
int kp_storage_same_content(const char *a, const char *b);
/* The original's note. pacs-compressor moves a compressed instance to a file of its own name
 * and then removes the file at the instance's path (kp_storage_relpath), so the ingest's
 * duplicate check - a comparison with that file - would find nothing. Before it switches the
 * index, the compressor therefore leaves at aa/bb/<h>.orig (next to where the original was) a
 * few bytes of text: the size and SHA-256 of the file it compressed, i.e. of the instance as it
 * was received. kp_ingest looks for it with every instance it receives (one open() that fails
 * at once for a new one) and compares a second copy with it (see kp_ingest.c for when it is
 * believed); a replacing copy removes it. The name is not an instance's (kp_storage_walk, so
 * `pacsctl reindex`, skips it); backups copy and restore it like any stored file.
 * Path of the note of the instance with this SOP Instance UID (aa/bb/<h>.orig). */
void kp_storage_original_relpath(const char *sop_uid, char out[KP_STORAGE_RELPATH_MAX]);
/* Writes the note durably (temp file, fsync, rename, directory fsync), replacing one that is
 * there: size and sha256 (64 lower-case hex digits) of the original. 0, KP_EINVAL (not a
 * digest) or KP_EIO. */
int kp_storage_original_write(kp_storage_t *st, const char *sop_uid, int64_t size,
                              const char *sha256);
/* Reads the note: 1 and *size, sha256 set; 0 when there is none; KP_EIO when it cannot be read
 * or is not a note (logged). One open() that fails at once when there is none. */
int kp_storage_original_read(kp_storage_t *st, const char *sop_uid, int64_t *size, char sha256[65]);
/* Removes the note durably (unlink, directory fsync). 0 (also when there was none) or KP_EIO. */
int kp_storage_original_remove(kp_storage_t *st, const char *sop_uid);
/* 1 when the file at path has this size and SHA-256, 0 when not, KP_EIO when unreadable. */
int kp_storage_file_is(const char *path, int64_t size, const char *sha256);

/* Calls fn(user, rel) for every stored file under root (in directory order), stopping when fn
 * returns non-zero (that value is returned). Temp files are skipped. */
int kp_storage_walk(kp_storage_t *st, int (*fn)(void *user, const char *rel), void *user);
/* Removes temp files older than max_age_s seconds (left behind by a crash). Returns how many. */
int kp_storage_clean_tmp(kp_storage_t *st, int max_age_s);

#endif
