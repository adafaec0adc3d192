/* The libfcgi contender: the smallest FCGX_Accept_r responder, one request at a time per
 * process, answering what app-example's /hello answers. Built and started by bench/run. */
#include <fcgiapp.h>

int main(void)
{
    FCGX_Request request;

    if (FCGX_Init() != 0)
        return 1;
    FCGX_InitRequest(&request, 0, 0);
    while (FCGX_Accept_r(&request) >= 0) {
        FCGX_PutS("Status: 200 OK\r\n"
                  "Content-Type: text/plain\r\n"
                  "Content-Length: 14\r\n"
                  "\r\n"
                  "Hello, world!\n",
                  request.out);
        FCGX_Finish_r(&request);
    }
    return 0;
}
