/* Unit tests of kp_totp: RFC 6238 Appendix B vectors, the ±1 step window, replay refusal, the
 * enrolment URI, base32, and single-use recovery codes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_errors.h"
#include "kp_password.h"
#include "kp_totp.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* RFC 6238 Appendix B: the SHA-1 seed is the ASCII string "12345678901234567890". */
static const uint8_t s_rfc_secret[] = "12345678901234567890";
#define S_RFC_LEN 20

static void test_rfc6238_vectors(void **state)
{
    (void)state;
    static const struct {
        time_t t;
        const char *code8;
    } v[] = {
        {59, "94287082"},         {1111111109, "07081804"}, {1111111111, "14050471"},
        {1234567890, "89005924"}, {2000000000, "69279037"}, {(time_t)20000000000LL, "65353130"},
    };
    for (size_t i = 0; i < sizeof v / sizeof *v; i++) {
        char out[9];
        assert_int_equal(kp_totp_code(s_rfc_secret, S_RFC_LEN, v[i].t, 8, out), 0);
        assert_string_equal(out, v[i].code8);
        /* 6 digits: the same truncated value modulo 10^6, i.e. the last six digits */
        assert_int_equal(kp_totp_code(s_rfc_secret, S_RFC_LEN, v[i].t, 6, out), 0);
        assert_string_equal(out, v[i].code8 + 2);
        /* and verify accepts it at that time, reporting the RFC's time step */
        int64_t step = -1;
        assert_int_equal(kp_totp_verify(s_rfc_secret, S_RFC_LEN, out, v[i].t, 0, &step), 0);
        assert_int_equal(step, (int64_t)v[i].t / 30);
    }
    char out[9];
    assert_int_equal(kp_totp_code(s_rfc_secret, S_RFC_LEN, 59, 5, out), KP_EINVAL);
    assert_int_equal(kp_totp_code(s_rfc_secret, S_RFC_LEN, 59, 9, out), KP_EINVAL);
}

static void test_window(void **state)
{
    (void)state;
    const time_t now = 1111111111;
    const int64_t base = now / 30;
    char code[9];
    int64_t step = 0;
    for (int d = -1; d <= 1; d++) {
        assert_int_equal(kp_totp_code(s_rfc_secret, S_RFC_LEN, now + 30 * d, 6, code), 0);
        assert_int_equal(kp_totp_verify(s_rfc_secret, S_RFC_LEN, code, now, 0, &step), 0);
        assert_int_equal(step, base + d);
    }
    for (int d = -2; d <= 2; d += 4) {
        assert_int_equal(kp_totp_code(s_rfc_secret, S_RFC_LEN, now + 30 * d, 6, code), 0);
        assert_int_equal(kp_totp_verify(s_rfc_secret, S_RFC_LEN, code, now, 0, &step), KP_EUNAUTH);
    }
    /* a wrong code and malformed text */
    assert_int_equal(kp_totp_code(s_rfc_secret, S_RFC_LEN, now, 6, code), 0);
    code[5] = code[5] == '9' ? '0' : (char)(code[5] + 1);
    assert_int_equal(kp_totp_verify(s_rfc_secret, S_RFC_LEN, code, now, 0, NULL), KP_EUNAUTH);
    const char *bad[] = {"", "12345", "1234567", "12a456", " 12345", "-12345", "050471\n"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(kp_totp_verify(s_rfc_secret, S_RFC_LEN, bad[i], now, 0, NULL), KP_EUNAUTH);
    /* another secret does not accept this secret's code */
    assert_int_equal(kp_totp_code(s_rfc_secret, S_RFC_LEN, now, 6, code), 0);
    assert_int_equal(
        kp_totp_verify((const uint8_t *)"12345678901234567891", 20, code, now, 0, NULL),
        KP_EUNAUTH);
}

static void test_replay(void **state)
{
    (void)state;
    const time_t now = 1234567890;
    char code[9], prev[9], next[9];
    int64_t step = 0, last;
    assert_int_equal(kp_totp_code(s_rfc_secret, S_RFC_LEN, now, 6, code), 0);
    assert_int_equal(kp_totp_verify(s_rfc_secret, S_RFC_LEN, code, now, 0, &step), 0);
    last = step;
    /* the same code again, even a few seconds later: a replay */
    assert_int_equal(kp_totp_verify(s_rfc_secret, S_RFC_LEN, code, now + 5, last, &step),
                     KP_ECONFLICT);
    /* an older, still-in-window code after a newer one was accepted: refused too */
    assert_int_equal(kp_totp_code(s_rfc_secret, S_RFC_LEN, now - 30, 6, prev), 0);
    assert_int_equal(kp_totp_verify(s_rfc_secret, S_RFC_LEN, prev, now, last, &step), KP_ECONFLICT);
    /* the next step's code is fine and moves last forward */
    assert_int_equal(kp_totp_code(s_rfc_secret, S_RFC_LEN, now + 30, 6, next), 0);
    assert_int_equal(kp_totp_verify(s_rfc_secret, S_RFC_LEN, next, now + 30, last, &step), 0);
    assert_int_equal(step, last + 1);
    /* a wrong code with a last step is still just wrong, not a replay */
    assert_int_equal(
        kp_totp_verify(s_rfc_secret, S_RFC_LEN, "000000", now, last, &step) == KP_ECONFLICT, 0);
}

static void test_secret_and_uri(void **state)
{
    (void)state;
    char b32[KP_TOTP_SECRET_B32_MAX];
    assert_int_equal(kp_totp_secret_base32(s_rfc_secret, S_RFC_LEN, b32, sizeof b32), 0);
    assert_string_equal(b32, "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
    char small[8];
    assert_int_equal(kp_totp_secret_base32(s_rfc_secret, S_RFC_LEN, small, sizeof small),
                     KP_EINVAL);
    uint8_t back[64];
    size_t len = 0;
    assert_int_equal(
        kp_totp_secret_decode("gezd gnbv gy3t qojq gezd gnbv gy3t qojq", back, sizeof back, &len),
        0);
    assert_int_equal(len, 20);
    assert_memory_equal(back, s_rfc_secret, 20);
    assert_int_equal(kp_totp_secret_decode("not base32!", back, sizeof back, &len), KP_EINVAL);
    assert_int_equal(kp_totp_secret_decode("", back, sizeof back, &len), KP_EINVAL);
    assert_int_equal(kp_totp_secret_decode("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ", back, 10, &len),
                     KP_EINVAL);

    uint8_t s1[KP_TOTP_SECRET_LEN], s2[KP_TOTP_SECRET_LEN];
    assert_int_equal(kp_totp_secret_new(s1), 0);
    assert_int_equal(kp_totp_secret_new(s2), 0);
    assert_memory_not_equal(s1, s2, KP_TOTP_SECRET_LEN);
    assert_int_equal(kp_totp_secret_base32(s1, sizeof s1, b32, sizeof b32), 0);
    assert_int_equal(strlen(b32), 32);
    assert_int_equal(kp_totp_secret_decode(b32, back, sizeof back, &len), 0);
    assert_int_equal(len, KP_TOTP_SECRET_LEN);
    assert_memory_equal(back, s1, KP_TOTP_SECRET_LEN);

    char *uri =
        kp_totp_uri("Klinika PACS", "jan.kowalski@example.org", "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
    assert_string_equal(uri, "otpauth://totp/Klinika%20PACS:jan.kowalski%40example.org"
                             "?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Klinika%20PACS"
                             "&algorithm=SHA1&digits=6&period=30");
    free(uri);
    /* separators and non-ASCII in names are encoded, never passed through */
    uri = kp_totp_uri("A&B:C", "zażółć?x=1#", "AAAA");
    assert_string_equal(uri, "otpauth://totp/A%26B%3AC:za%C5%BC%C3%B3%C5%82%C4%87%3Fx%3D1%23"
                             "?secret=AAAA&issuer=A%26B%3AC&algorithm=SHA1&digits=6&period=30");
    free(uri);
}

static void test_recovery_codes(void **state)
{
    (void)state;
    char codes[KP_TOTP_RECOVERY_COUNT][KP_TOTP_RECOVERY_CODE_MAX];
    char hashes[KP_TOTP_RECOVERY_COUNT][65];
    assert_int_equal(kp_totp_recovery_new(codes, hashes), 0);
    const char *stored[KP_TOTP_RECOVERY_COUNT];
    for (int i = 0; i < KP_TOTP_RECOVERY_COUNT; i++) {
        /* xxxx-xxxx-xxxx-xxxx from the unambiguous alphabet */
        assert_int_equal(strlen(codes[i]), 19);
        for (int k = 0; k < 19; k++) {
            if (k % 5 == 4)
                assert_int_equal(codes[i][k], '-');
            else
                assert_non_null(strchr("0123456789abcdefghjkmnpqrstvwxyz", codes[i][k]));
        }
        assert_int_equal(strlen(hashes[i]), 64);
        for (int j = 0; j < i; j++) {
            assert_string_not_equal(codes[i], codes[j]);
            assert_string_not_equal(hashes[i], hashes[j]);
        }
        /* what is stored is not the code */
        assert_null(strstr(hashes[i], codes[i]));
        stored[i] = hashes[i];
    }
    /* each code works once: the caller marks the matched slot used */
    for (int i = KP_TOTP_RECOVERY_COUNT - 1; i >= 0; i--) {
        int idx = kp_totp_recovery_verify(codes[i], stored, KP_TOTP_RECOVERY_COUNT);
        assert_int_equal(idx, i);
        stored[idx] = NULL;
        assert_int_equal(kp_totp_recovery_verify(codes[i], stored, KP_TOTP_RECOVERY_COUNT),
                         KP_EUNAUTH);
    }
    /* forgiving typing: upper case, no dashes, spaces */
    assert_int_equal(kp_totp_recovery_new(codes, hashes), 0);
    for (int i = 0; i < KP_TOTP_RECOVERY_COUNT; i++)
        stored[i] = hashes[i];
    char typed[40];
    size_t n = 0;
    for (const char *p = codes[3]; *p; p++) {
        if (*p == '-') {
            typed[n++] = ' ';
            continue;
        }
        typed[n++] = (char)toupper((unsigned char)*p);
    }
    typed[n] = 0;
    assert_int_equal(kp_totp_recovery_verify(typed, stored, KP_TOTP_RECOVERY_COUNT), 3);
    /* 0 and 1 may be typed as o and l/i */
    char mapped[KP_TOTP_RECOVERY_CODE_MAX];
    strcpy(mapped, codes[5]);
    for (char *p = mapped; *p; p++) {
        if (*p == '0')
            *p = 'O';
        else if (*p == '1')
            *p = 'l';
    }
    assert_int_equal(kp_totp_recovery_verify(mapped, stored, KP_TOTP_RECOVERY_COUNT), 5);
    char fixed[65];
    kp_sha256_hex("0123456789abcd10", fixed);
    const char *one[] = {NULL, fixed};
    assert_int_equal(kp_totp_recovery_verify("O123-4567-89AB-CDIo", one, 2), 1);
    assert_int_equal(kp_totp_recovery_verify("o123 4567 89ab cdL0", one, 2), 1);
    assert_int_equal(kp_totp_recovery_verify("0123-4567-89ab-cdu0", one, 2), KP_EUNAUTH);
    /* wrong codes */
    char wrong[KP_TOTP_RECOVERY_CODE_MAX];
    strcpy(wrong, codes[0]);
    wrong[0] = wrong[0] == 'a' ? 'b' : 'a';
    assert_int_equal(kp_totp_recovery_verify(wrong, stored, KP_TOTP_RECOVERY_COUNT), KP_EUNAUTH);
    assert_int_equal(kp_totp_recovery_verify("", stored, KP_TOTP_RECOVERY_COUNT), KP_EUNAUTH);
    assert_int_equal(kp_totp_recovery_verify("uuuu-uuuu-uuuu-uuuu", stored, 10), KP_EUNAUTH);
    char longer[40];
    snprintf(longer, sizeof longer, "%s-a", codes[0]);
    assert_int_equal(kp_totp_recovery_verify(longer, stored, KP_TOTP_RECOVERY_COUNT), KP_EUNAUTH);
    /* the stored hash itself is not a code */
    assert_int_equal(kp_totp_recovery_verify(hashes[0], stored, KP_TOTP_RECOVERY_COUNT),
                     KP_EUNAUTH);
    /* the stored form is SHA-256 of the canonical code (no dashes) */
    char canon[17], h[65];
    snprintf(canon, sizeof canon, "%.4s%.4s%.4s%.4s", codes[0], codes[0] + 5, codes[0] + 10,
             codes[0] + 15);
    kp_sha256_hex(canon, h);
    assert_string_equal(h, hashes[0]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rfc6238_vectors), cmocka_unit_test(test_window),
        cmocka_unit_test(test_replay),          cmocka_unit_test(test_secret_and_uri),
        cmocka_unit_test(test_recovery_codes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
