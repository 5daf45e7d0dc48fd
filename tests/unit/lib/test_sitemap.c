/* Unit tests of the sites.map rules the indexer uses to put a new study in a site. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_index.h"

#include <string.h>

static void test_rules(void **state)
{
    (void)state;
    kp_index_set_site_map(" calling_ae:CT_NORTH = north ; institution:North General Hospital=north;"
                          "calling_ae:MR_SOUTH=south;  ; bogus rule; colour:red=x; calling_ae:=y");
    assert_string_equal(kp_index_site_for("CT_NORTH", NULL), "north");
    assert_string_equal(kp_index_site_for("MR_SOUTH", "North General Hospital"), "north"); /* order */
    assert_string_equal(kp_index_site_for("OTHER", "north general HOSPITAL"), "north"); /* case */
    assert_string_equal(kp_index_site_for("MR_SOUTH", NULL), "south");
    assert_null(kp_index_site_for("ct_north", NULL)); /* AE titles are case-sensitive */
    assert_null(kp_index_site_for(NULL, NULL));
    assert_null(kp_index_site_for("OTHER", "Elsewhere"));
    kp_index_set_site_map("");
    assert_null(kp_index_site_for("CT_NORTH", NULL));
    kp_index_set_site_map(NULL);
    assert_null(kp_index_site_for("CT_NORTH", NULL));
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_rules)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
