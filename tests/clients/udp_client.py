import socket

def udp_client():
    # 创建UDP套接字 AF_INET: 使用 IPv4 地；SOCK_DGRAM: 数据报套接字（UDP）
    client_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    
    # 定义服务器地址和端口
    server_address = ("127.0.0.1", 12345)
    
    try:
        # 发送数据到服务器
        message = "Hello, server!".encode()
        client_socket.sendto(message, server_address)
        
        # 接收服务器的响应
        data, server = client_socket.recvfrom(4096)
        print(f"Received {data.decode()} from server")
        
        # 发送退出消息
        exit_message = "exit".encode()
        client_socket.sendto(exit_message, server_address)
    
    finally:
        # 关闭套接字
        client_socket.close()

if __name__ == "__main__":
    udp_client()
