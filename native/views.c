/*
 * views.c - the per-page text views (info/mmu, info/dirty/A.S), formatted in C
 * so that a view of a big VM costs no Python work per page.
 *
 * Both stream their text in pieces from a cursor (whole lines, at most `size`
 * bytes a call, 0 at the end), so that a view of a big VM costs the daemon one
 * piece at a time however long it is.  Negative: -errno.
 *
 * Locking: none of its own; the MMU calls it makes take mmu->lock each (a view
 * is a snapshot per call, not an atomic one).
 */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "kvmfs_internal.h"

/* One piece of a view's text: whole lines only, at most size bytes. */
struct piece {
	char *buf;
	uint64_t size, len;
};

static bool put_line(struct piece *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Append one line; false (nothing written) when it does not fit in the piece. */
static bool put_line(struct piece *p, const char *fmt, ...)
{
	char line[128];
	va_list ap;

	va_start(ap, fmt);
	int l = vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	if (l < 0 || p->len + (uint64_t)l > p->size)
		return false;
	memcpy(p->buf + p->len, line, (size_t)l);
	p->len += (uint64_t)l;
	return true;
}

/* info/mmu in pieces, as kvmfs_view_dirty: *cursor 0 is the header, c > 0 the
 * sptes from list position c - 1 on. */
int64_t kvmfs_view_sptes(kvmfs_mmu *mmu, uint64_t *cursor, char *buf, uint64_t size)
{
	enum { BATCH = 256 };
	struct kvmfs_spte_info s[BATCH];
	struct piece p = { buf, size, 0 };
	uint64_t c = *cursor;

	if (size < 128)
		return -EINVAL;
	if (c == 0 && put_line(&p, "as gfn hva uphys perms\n"))
		c = 1;
	for (;;) {
		uint64_t pos = c - 1;
		int got = kvmfs_mmu_list_sptes_from(mmu, &pos, s, BATCH);
		for (int i = 0; i < got; i++) {
			if (!put_line(&p, "%u 0x%llx 0x%llx 0x%llx R%c%c%c%c\n", s[i].as_id,
				      (unsigned long long)s[i].gfn, (unsigned long long)s[i].hva,
				      (unsigned long long)s[i].uphys,
				      s[i].flags & KVMFS_SPTE_W ? 'W' : '-', s[i].flags & KVMFS_SPTE_X ? 'X' : '-',
				      s[i].flags & KVMFS_SPTE_A ? 'A' : '-', s[i].flags & KVMFS_SPTE_D ? 'D' : '-')) {
				*cursor = ((uint64_t)s[i].as_id << KVMFS_SPTE_POS_AS_SHIFT | s[i].gfn) + 1;
				return (int64_t)p.len;
			}
		}
		c = pos + 1;
		if (got < BATCH)
			break;
	}
	*cursor = c;
	return (int64_t)p.len;
}

int64_t kvmfs_view_dirty(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, uint64_t *cursor,
			 char *buf, uint64_t size)
{
	struct kvmfs_slot_info info;
	struct piece p = { buf, size, 0 };
	uint64_t words[64], c = *cursor;
	int rc = kvmfs_memslot_get(mmu, as_id, id, &info);

	if (rc < 0)
		return rc;
	if (size < 64)
		return -EINVAL;
	if (c == 0 && put_line(&p, "page gpa\n"))
		c = 1;
	for (;;) {
		uint64_t first = (c - 1) / 64;
		int64_t n = kvmfs_dirty_peek_words(mmu, as_id, id, first, words, 64);
		if (n <= 0) {                   /* the end, or the slot stopped logging */
			if (n < 0 && !p.len)
				return n;
			break;
		}
		for (int64_t i = 0; i < n; i++) {
			uint64_t word = words[i];
			if (first + (uint64_t)i == (c - 1) / 64)         /* skip pages already shown */
				word &= ~0ull << ((c - 1) % 64);
			for (; word; word &= word - 1) {
				uint64_t page = (first + (uint64_t)i) * 64 + (uint64_t)__builtin_ctzll(word);
				if (!put_line(&p, "%llu 0x%llx\n", (unsigned long long)page,
					      (unsigned long long)((info.base_gfn + page) << PAGE_SHIFT))) {
					*cursor = page + 1;
					return (int64_t)p.len;
				}
			}
		}
		c = (first + (uint64_t)n) * 64 + 1;
	}
	*cursor = c;
	return (int64_t)p.len;
}
