/* Unit tests of kp_password: Argon2id round trip, wrong and tampered hashes, rehash detection,
 * the password policy with the bundled common-password list, token and hash helpers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_config.h"
#include "kp_errors.h"
#include "kp_password.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Cheap parameters so the suite stays fast; one test uses the defaults. */
static kp_config_t *s_cfg(const char *t, const char *m)
{
    char err[256];
    kp_config_t *c = kp_config_new();
    assert_non_null(c);
    assert_int_equal(kp_config_set(c, "auth.argon2_t", t, err, sizeof err), 0);
    assert_int_equal(kp_config_set(c, "auth.argon2_m_kib", m, err, sizeof err), 0);
    return c;
}

static void test_round_trip(void **state)
{
    (void)state;
    kp_config_t *c = s_cfg("1", "1024");
    char *h = NULL, *h2 = NULL;
    assert_int_equal(kp_password_hash(c, "correct horse battery staple", &h), 0);
    assert_non_null(h);
    assert_true(strncmp(h, "$argon2id$v=19$m=1024,t=1,p=1$", 30) == 0);
    /* 16-byte salt = 22 base64 characters, 32-byte hash = 43 */
    const char *salt = h + 30, *dollar = strchr(salt, '$');
    assert_non_null(dollar);
    assert_int_equal(dollar - salt, 22);
    assert_int_equal(strlen(dollar + 1), 43);
    bool rehash = true;
    assert_int_equal(kp_password_verify(c, h, "correct horse battery staple", &rehash), 0);
    assert_false(rehash);
    /* a fresh salt each time */
    assert_int_equal(kp_password_hash(c, "correct horse battery staple", &h2), 0);
    assert_string_not_equal(h, h2);
    assert_int_equal(kp_password_verify(c, h2, "correct horse battery staple", NULL), 0);
    /* UTF-8 passwords */
    free(h2);
    assert_int_equal(kp_password_hash(c, "Pchnąć w tę łódź jeża", &h2), 0);
    assert_int_equal(kp_password_verify(c, h2, "Pchnąć w tę łódź jeża", NULL), 0);
    assert_int_equal(kp_password_verify(c, h2, "Pchnac w te lodz jeza", NULL), KP_EUNAUTH);
    free(h);
    free(h2);
    kp_config_destroy(&c);
}

static void test_default_parameters(void **state)
{
    (void)state;
    kp_config_t *c = kp_config_new();
    char *h = NULL;
    assert_int_equal(kp_password_hash(c, "a reasonably long passphrase", &h), 0);
    assert_true(strncmp(h, "$argon2id$v=19$m=65536,t=3,p=1$", 31) == 0);
    bool rehash = true;
    assert_int_equal(kp_password_verify(c, h, "a reasonably long passphrase", &rehash), 0);
    assert_false(rehash);
    free(h);
    kp_config_destroy(&c);
}

static void test_wrong_password(void **state)
{
    (void)state;
    kp_config_t *c = s_cfg("1", "1024");
    char *h = NULL;
    assert_int_equal(kp_password_hash(c, "the right one, long enough", &h), 0);
    bool rehash = true;
    assert_int_equal(kp_password_verify(c, h, "the right one, long enougH", &rehash), KP_EUNAUTH);
    assert_false(rehash);
    assert_int_equal(kp_password_verify(c, h, "", NULL), KP_EUNAUTH);
    assert_int_equal(kp_password_verify(c, h, "the right one, long enough ", NULL), KP_EUNAUTH);
    /* unknown user: same refusal */
    assert_int_equal(kp_password_verify(c, NULL, "the right one, long enough", NULL), KP_EUNAUTH);
    /* absurdly long input is refused without trouble */
    char *big = malloc(100001);
    memset(big, 'x', 100000);
    big[100000] = 0;
    assert_int_equal(kp_password_verify(c, h, big, NULL), KP_EUNAUTH);
    char *hb = NULL;
    assert_int_equal(kp_password_hash(c, big, &hb), KP_EINVAL);
    assert_null(hb);
    free(big);
    free(h);
    kp_config_destroy(&c);
}

static void test_tampered(void **state)
{
    (void)state;
    kp_config_t *c = s_cfg("1", "1024");
    const char *pw = "tamper evident passphrase";
    char *h = NULL;
    assert_int_equal(kp_password_hash(c, pw, &h), 0);
    size_t len = strlen(h);
    char *t = strdup(h);
    /* one character of the hash changed */
    t[len - 5] = t[len - 5] == 'A' ? 'B' : 'A';
    assert_int_equal(kp_password_verify(c, t, pw, NULL), KP_EUNAUTH);
    /* one character of the salt changed */
    strcpy(t, h);
    t[31] = t[31] == 'A' ? 'B' : 'A';
    assert_int_equal(kp_password_verify(c, t, pw, NULL), KP_EUNAUTH);
    /* parameters changed: a different hash */
    char buf[256];
    snprintf(buf, sizeof buf, "$argon2id$v=19$m=1024,t=2,p=1$%s", h + 30);
    assert_int_equal(kp_password_verify(c, buf, pw, NULL), KP_EUNAUTH);
    /* malformed or out of bounds: refused as invalid, never crashing */
    const char *bad[] = {
        "",
        "garbage",
        "$argon2id$",
        "$argon2i$v=19$m=1024,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=16$m=1024,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=99999999,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=1024,t=0,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHRzYWx0$",
        "$argon2id$v=19$m=1024,t=1,p=1$$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=1024,t=1,p=1$c2Fs!HNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=-1024,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA$x",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(kp_password_verify(c, bad[i], pw, NULL), KP_EINVAL);
    /* truncated real hash */
    strcpy(t, h);
    t[len - 20] = 0;
    assert_int_not_equal(kp_password_verify(c, t, pw, NULL), 0);
    free(t);
    free(h);
    kp_config_destroy(&c);
}

static void test_rehash(void **state)
{
    (void)state;
    char err[256];
    kp_config_t *c = s_cfg("1", "1024");
    const char *pw = "rehash me when settings rise";
    char *h = NULL, *h2 = NULL;
    assert_int_equal(kp_password_hash(c, pw, &h), 0);
    bool rehash = true;
    assert_int_equal(kp_password_verify(c, h, pw, &rehash), 0);
    assert_false(rehash);
    /* settings raised: the old hash still verifies (its own parameters) but needs a rehash */
    assert_int_equal(kp_config_set(c, "auth.argon2_t", "2", err, sizeof err), 0);
    assert_int_equal(kp_password_verify(c, h, pw, &rehash), 0);
    assert_true(rehash);
    assert_int_equal(kp_password_verify(c, h, "wrong", &rehash), KP_EUNAUTH);
    assert_false(rehash);
    assert_int_equal(kp_password_hash(c, pw, &h2), 0);
    assert_true(strncmp(h2, "$argon2id$v=19$m=1024,t=2,p=1$", 30) == 0);
    assert_int_equal(kp_password_verify(c, h2, pw, &rehash), 0);
    assert_false(rehash);
    /* memory and lanes count too */
    assert_int_equal(kp_config_set(c, "auth.argon2_m_kib", "2048", err, sizeof err), 0);
    assert_int_equal(kp_password_verify(c, h2, pw, &rehash), 0);
    assert_true(rehash);
    assert_int_equal(kp_config_set(c, "auth.argon2_m_kib", "1024", err, sizeof err), 0);
    assert_int_equal(kp_config_set(c, "auth.argon2_p", "2", err, sizeof err), 0);
    assert_int_equal(kp_password_verify(c, h2, pw, &rehash), 0);
    assert_true(rehash);
    free(h);
    free(h2);
    kp_config_destroy(&c);
}

static void test_policy(void **state)
{
    (void)state;
    kp_config_t *c = kp_config_new();
    kp_password_policy_t *pol = kp_password_policy_new(c);
    assert_non_null(pol);
    /* the bundled list is there and large */
    assert_true(kp_password_policy_list_size(pol) >= 10000);
    const char *why = NULL;
    /* good */
    assert_int_equal(kp_password_policy_check(pol, "jkowalski", "Blue-Harbour-Lantern-42", &why),
                     0);
    assert_null(why);
    assert_int_equal(kp_password_policy_check(pol, NULL, "Blue-Harbour-Lantern-42", &why), 0);
    /* exactly the minimum length is fine, one less is not */
    assert_int_equal(kp_password_policy_check(pol, "jkowalski", "vq7#mzp2!kaw", &why), 0);
    assert_int_equal(kp_password_policy_check(pol, "jkowalski", "vq7#mzp2!ka", &why), KP_EINVAL);
    assert_non_null(strstr(why, "too short"));
    /* length counts characters: 12 two-byte characters pass */
    assert_int_equal(kp_password_policy_check(pol, "x", "ąęółśżźćńąęó", &why), 0);
    /* too long */
    char longpw[300];
    memset(longpw, 'k', 257);
    longpw[257] = 0;
    longpw[3] = '7';
    assert_int_equal(kp_password_policy_check(pol, "jkowalski", longpw, &why), KP_EINVAL);
    assert_non_null(strstr(why, "too long"));
    longpw[256] = 0;
    assert_int_equal(kp_password_policy_check(pol, "jkowalski", longpw, &why), 0);
    /* the user name, in another case, alone or inside */
    assert_int_equal(kp_password_policy_check(pol, "jkowalski1234", "JKOWALSKI1234", &why),
                     KP_EINVAL);
    assert_non_null(strstr(why, "be the user name"));
    assert_int_equal(kp_password_policy_check(pol, "jkowalski", "my-JKowalski-pass", &why),
                     KP_EINVAL);
    assert_non_null(strstr(why, "contain the user name"));
    /* real entries of config/common-passwords.txt, any case */
    assert_int_equal(kp_password_policy_check(pol, "jkowalski", "qwerty123456", &why), KP_EINVAL);
    assert_non_null(strstr(why, "common"));
    assert_int_equal(kp_password_policy_check(pol, "jkowalski", "123QWEasdZXC", &why), KP_EINVAL);
    assert_non_null(strstr(why, "common"));
    /* invalid UTF-8 */
    assert_int_equal(kp_password_policy_check(pol, "jkowalski", "abcdefghijk\xff\xfe", &why),
                     KP_EINVAL);
    assert_int_equal(kp_password_policy_check(pol, "jkowalski", "abcdefghijk\xc0\xaf", &why),
                     KP_EINVAL);
    kp_password_policy_destroy(&pol);
    assert_null(pol);
    kp_password_policy_destroy(&pol);
    kp_config_destroy(&c);
}

static void test_policy_list_file(void **state)
{
    (void)state;
    char err[256], path[64];
    snprintf(path, sizeof path, "/tmp/kp-test-common-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fputs("# source: test, license: none\n\n  Zebra-Crossing-99  \r\n#commented-out-entry\n"
          "alpha-beta-gamma\nalpha-beta-gamma\n",
          f);
    fclose(f);
    kp_config_t *c = kp_config_new();
    assert_int_equal(kp_config_set(c, "auth.common_passwords", path, err, sizeof err), 0);
    kp_password_policy_t *pol = kp_password_policy_new(c);
    assert_int_equal(kp_password_policy_list_size(pol), 2);
    assert_int_equal(kp_password_policy_check(pol, NULL, "zebra-crossing-99", NULL), KP_EINVAL);
    assert_int_equal(kp_password_policy_check(pol, NULL, "ALPHA-beta-gamma", NULL), KP_EINVAL);
    assert_int_equal(kp_password_policy_check(pol, NULL, "#commented-out-entry", NULL), 0);
    kp_password_policy_destroy(&pol);
    unlink(path);
    /* a missing list: a warning, and the check is skipped */
    assert_int_equal(
        kp_config_set(c, "auth.common_passwords", "/nonexistent/list.txt", err, sizeof err), 0);
    pol = kp_password_policy_new(c);
    assert_non_null(pol);
    assert_int_equal(kp_password_policy_list_size(pol), 0);
    assert_int_equal(kp_password_policy_check(pol, NULL, "qwerty123456", NULL), 0);
    assert_int_equal(kp_password_policy_check(pol, NULL, "short", NULL), KP_EINVAL);
    kp_password_policy_destroy(&pol);
    kp_config_destroy(&c);
}

static void test_tokens(void **state)
{
    (void)state;
    char *a = kp_random_token(16), *b = kp_random_token(16);
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(strlen(a), 22);
    assert_string_not_equal(a, b);
    for (const char *p = a; *p; p++)
        assert_non_null(
            strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", *p));
    free(a);
    free(b);
    a = kp_random_token(32);
    assert_int_equal(strlen(a), 43);
    free(a);
    assert_null(kp_random_token(0));
    char hex[65];
    kp_sha256_hex("abc", hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    kp_sha256_hex("", hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_true(kp_secret_equal("abc", "abc"));
    assert_false(kp_secret_equal("abc", "abd"));
    assert_false(kp_secret_equal("abc", "abcd"));
    assert_true(kp_secret_equal("", ""));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),       cmocka_unit_test(test_default_parameters),
        cmocka_unit_test(test_wrong_password),   cmocka_unit_test(test_tampered),
        cmocka_unit_test(test_rehash),           cmocka_unit_test(test_policy),
        cmocka_unit_test(test_policy_list_file), cmocka_unit_test(test_tokens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
